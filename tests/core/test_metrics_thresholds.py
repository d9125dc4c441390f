"""Metrics against brute force; thresholds from OK images mean what they say."""
import itertools

import numpy as np
import pytest

from core import metrics
from core.thresholds import calibrate, quantile_threshold, verdict


def brute_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 10, 60).astype(float)  # many ties
    assert metrics.auroc(y, s) == pytest.approx(brute_auroc(y, s))


def test_auroc_is_nan_with_one_class():
    assert np.isnan(metrics.auroc(np.zeros(4), np.arange(4.0)))


def test_fpr_at_95_tpr():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.6, 0.95])
    # all positives are caught only once the threshold is at or below 0.4 -> 1 of 4 negatives above
    assert metrics.fpr_at_tpr(y, s, 0.95) == pytest.approx(0.25)


def test_best_f1_threshold_separates_separable_data():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([1.0, 2.0, 3.0, 7.0, 8.0])
    t, f1 = metrics.best_f1_threshold(y, s)
    assert 3.0 <= t < 7.0 and f1 == pytest.approx(1.0)
    assert metrics.confusion_at(y, s, t)["f1"] == pytest.approx(1.0)


def test_pro_is_one_for_a_perfect_map_and_low_for_an_inverted_one():
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 4:10, 4:10] = True
    masks[1, 20:30, 2:6] = True
    perfect = masks.astype(float) + np.random.default_rng(0).uniform(0, 0.1, masks.shape)
    assert metrics.pro_score(masks, perfect) > 0.95
    assert metrics.pro_score(masks, -perfect) < 0.1
    assert metrics.pixel_auroc(masks, perfect) == pytest.approx(1.0)


def test_calibrated_threshold_lets_at_most_the_target_rate_of_ok_scores_through():
    ok = np.arange(1.0, 201.0)  # 200 held-out OK scores
    t = quantile_threshold(ok, 0.01)
    assert (ok > t).mean() <= 0.01
    assert (ok > t).sum() == 2  # and not stricter than needed
    th = calibrate(ok, ok + 1, 0.01)
    assert th.expected_false_alarm_rate() == pytest.approx(0.01)
    assert th.expected_false_alarm_rate(0.0) == 1.0


def test_verdict_is_ng_strictly_above_threshold():
    assert verdict(1.0, 1.0) == "OK" and verdict(1.0001, 1.0) == "NG"


def test_false_alarm_bound_is_clopper_pearson():
    from core.thresholds import false_alarm_upper_bound, held_out_needed

    # 0 of n: the bound solves (1 - p)^n = 0.05 exactly
    for n in (1, 2, 10, 40, 300):
        assert false_alarm_upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-6)
    assert false_alarm_upper_bound(0, 40) == pytest.approx(0.0722, abs=1e-4)
    # 2 of 40 (reference value from the beta quantile, scipy.stats.beta.ppf(0.95, 3, 38))
    assert false_alarm_upper_bound(2, 40) == pytest.approx(0.1490, abs=2e-4)
    assert false_alarm_upper_bound(40, 40) == 1.0 and false_alarm_upper_bound(0, 0) == 1.0
    assert held_out_needed(0.01) == 299 and false_alarm_upper_bound(0, 299) < 0.01 < false_alarm_upper_bound(0, 298)


def test_a_thresholds_bound_is_clopper_pearson_on_its_own_held_out_scores():
    from core.thresholds import false_alarm_upper_bound

    th = calibrate(np.arange(1.0, 41.0), np.arange(1.0, 41.0), 0.05)  # 40 held-out scores
    assert (th.calibration_scores > th.image).sum() == 2
    assert th.false_alarm_bound() == false_alarm_upper_bound(2, 40, 0.95)
    assert th.false_alarm_bound(threshold=40.0) == false_alarm_upper_bound(0, 40, 0.95)
    assert th.false_alarm_bound(confidence=0.99) == false_alarm_upper_bound(2, 40, 0.99)
    from core.thresholds import Thresholds

    assert Thresholds(5.0, 5.0).false_alarm_bound() is None  # set by hand: nothing to bound with


def test_pro_is_the_mean_region_overlap_integrated_over_the_false_positive_rate():
    # Two images, one region each. Negatives spread evenly over [0, 0.5). Image 0's region is
    # hotter than every negative (overlap 1 at every threshold); image 1's region sits at 0.45,
    # so it is found only while the threshold is below 0.45, i.e. at FPR >= 0.1. The mean
    # overlap is 0.5 up to FPR 0.1 and 1 after: area (0.5 * 0.1 + 1 * 0.2) / 0.3 = 5/6.
    masks = np.zeros((2, 100, 100), bool)
    masks[0, 10:20, 10:20] = True
    masks[1, 50:60, 50:60] = True
    maps = np.zeros((2, 100, 100))
    maps[~masks] = np.linspace(0.0, 0.5, int((~masks).sum()), endpoint=False)
    maps[0][masks[0]] = 1.0
    maps[1][masks[1]] = 0.45
    assert metrics.pro_score(masks, maps) == pytest.approx(5 / 6, abs=0.002)  # 200 steps: one smeared step
    assert metrics.pro_score(masks, maps, steps=2000) == pytest.approx(5 / 6, abs=3e-4)


def test_thresholds_match_their_calibration_until_either_is_moved_by_hand():
    th = calibrate(np.arange(1.0, 101.0), np.arange(11.0, 111.0), 0.05)
    assert th.matches_calibration()
    th.image += 0.5
    assert not th.matches_calibration()
    th = calibrate(np.arange(1.0, 101.0), np.arange(11.0, 111.0), 0.05)
    th.pixel -= 0.5
    assert not th.matches_calibration()
    from core.thresholds import Thresholds
    assert not Thresholds(5.0, 5.0).matches_calibration()  # nothing to match
    # a model file written before the margin: thresholds exactly on the held-out scores
    old = Thresholds(95.0, 105.0, np.arange(1.0, 101.0), np.arange(11.0, 111.0), 0.05)
    assert old.matches_calibration()


def test_the_confusion_counts_each_pair_once_with_ng_strictly_above_the_threshold():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([9.0, 5.0, 2.0, 6.0, 5.0, 1.0, 0.5, 0.0])
    c = metrics.confusion_at(labels, scores, 5.0)  # 5.0 itself is OK
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (1, 1, 2, 4)
    assert c["false_alarm_rate"] == pytest.approx(1 / 5) and c["detection_rate"] == pytest.approx(1 / 3)
    assert c["precision"] == pytest.approx(0.5) and c["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_fpr_at_tpr_takes_the_first_threshold_that_reaches_the_recall_exactly():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([8.0, 7.0, 6.0, 2.0, 6.5, 3.0, 1.0, 0.0])
    # recall 3/4 is reached above score 6 with one OK (6.5) above it: FPR 1/4
    assert metrics.fpr_at_tpr(labels, scores, 0.75) == pytest.approx(0.25)
    assert metrics.fpr_at_tpr(labels, scores, 1.0) == pytest.approx(0.5)


def test_best_f1_with_a_single_defect():
    labels = np.array([1, 0, 0, 0])
    t, f1 = metrics.best_f1_threshold(labels, np.array([3.0, 2.0, 1.0, 0.0]))
    assert 2.0 <= t < 3.0 and f1 == pytest.approx(1.0)


def test_auroc_needs_one_of_each_and_no_more():
    assert metrics.auroc(np.array([1, 0]), np.array([2.0, 1.0])) == 1.0
    assert metrics.auroc(np.array([1, 0]), np.array([1.0, 2.0])) == 0.0
    assert np.isnan(metrics.auroc(np.array([1, 1]), np.array([1.0, 2.0])))
    assert np.isnan(metrics.auroc(np.array([0, 0]), np.array([1.0, 2.0])))


def test_the_false_alarm_statement_gives_the_rate_its_bound_and_the_warning():
    """One statement for the Thresholds panel and `okng fit`: measured on the held-out OK
    parts at the threshold, with the 95 % upper bound; a warning when the parts are too few
    to show the target or the bound is above twice the target."""
    from core.thresholds import Thresholds, calibrate, false_alarm_statement

    scores = np.arange(400, dtype=float)
    th = calibrate(scores, scores, 0.01)
    text, warn = false_alarm_statement(th, 397.5)  # 2 of 400 above
    assert text == "0.5% of OK parts (at most 1.6% with 95 % confidence; 400 held-out parts)" and not warn
    text, warn = false_alarm_statement(th)  # at the image threshold: 4 above, bound 2.3 % > 2 x 1 %
    assert text == "1.0% of OK parts (at most 2.3% with 95 % confidence; 400 held-out parts)" and warn
    text, warn = false_alarm_statement(th, 379.5)  # 20 above: 5 %, bound far above 2 x 1 %
    assert text.startswith("5.0% of OK parts (at most 7.2%") and warn
    assert text.endswith("— above the 1% target at this threshold: raise it, or teach the station these parts")
    few = calibrate(scores[:40], scores[:40], 0.01)
    text, warn = false_alarm_statement(few)
    assert text.endswith("— too few held-out parts to show 1%: add OK images (299 held out needed)") and warn
    text, warn = false_alarm_statement(few, 32.5)  # 7 of 40 above: more parts would not change that
    assert "17.5% of OK parts" in text and "above the 1% target" in text and "add OK images" not in text and warn
    assert false_alarm_statement(None) == ("unknown (no held-out OK images to measure them on)", True)
    assert false_alarm_statement(Thresholds(1.0, 1.0))[1]


def test_one_held_out_part_far_above_the_others_is_named_when_it_sets_the_threshold():
    """One unusual good part (or a defective one among the OK images) sets the threshold by
    itself: the fit names it, with how far above the next held-out part it lies."""
    from core.thresholds import lone_part_text

    scores = np.array([10.0, 11.0, 12.0, 12.5, 30.0])
    names = [f"/ok/cell{i}.png" for i in range(5)]
    th = calibrate(scores, scores, 0.01)
    text = lone_part_text(th, names)
    assert "cell4.png (30" in text and "2.4x the next one" in text
    close = np.array([10.0, 11.0, 12.0, 12.5, 14.9])  # 1.19x the next: an ordinary spread
    assert lone_part_text(calibrate(close, close, 0.01), names) == ""
    assert lone_part_text(calibrate(np.array([10.0, 11.0, 12.0, 12.5, 15.0]), close, 0.01), names) != ""
    assert lone_part_text(th, names[:4]) == "" and lone_part_text(None, names) == ""
