"""Channel reweighting worked out by hand, and what a "real defect" label records."""
import numpy as np
import pytest
import torch

from core.detector import Detector, DetectorConfig
from core.feedback import MIN_WEIGHT, FeedbackLearner


@pytest.fixture
def learner():
    det = Detector.create(DetectorConfig(weights="random", image_size=64, n_channels=4))
    rng = np.random.default_rng(0)
    det.model.partial_fit(torch.from_numpy(rng.normal(0, 1, (30, 4, 8, 8)).astype(np.float32)))
    det.finalize()
    return FeedbackLearner(det, reweight=True)


def test_candidate_weights_lower_each_channel_by_its_excess_share_of_false_alarms(learner):
    # 4 channels: an even share is 0.25. Channel 0 carries 0.55 of the false alarms' distance,
    # channel 1 0.25 (no excess), channels 2 and 3 0.10 each.
    learner.fa_shares = [torch.tensor([0.6, 0.2, 0.1, 0.1]), torch.tensor([0.5, 0.3, 0.1, 0.1])]
    w = learner._candidate_weights(1.0)
    expected = 1.0 / (1.0 + 1.0 * 4 * torch.tensor([0.30, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(w, expected.clamp_min(MIN_WEIGHT))
    torch.testing.assert_close(learner._candidate_weights(10.0)[0], torch.tensor(MIN_WEIGHT))  # 1 / 13, floored
    assert learner._candidate_weights(0.0) is None  # no strength: no change


def test_a_channel_that_carries_confirmed_defects_at_least_as_much_is_never_lowered(learner):
    learner.fa_shares = [torch.tensor([0.55, 0.35, 0.05, 0.05])]
    learner.defect_shares = [torch.tensor([0.50, 0.40, 0.05, 0.05]), torch.tensor([0.60, 0.30, 0.05, 0.05])]
    w = learner._candidate_weights(1.0)
    # channel 0: defects 0.55 on average = false alarms 0.55 -> kept; channel 1: 0.35 vs 0.35 -> kept
    assert w is None  # nothing left to lower
    learner.defect_shares = [torch.tensor([0.40, 0.30, 0.15, 0.15])]
    w = learner._candidate_weights(1.0)
    torch.testing.assert_close(w, torch.tensor([1.0 / (1.0 + 4 * 0.30), 1.0 / (1.0 + 4 * 0.10), 1.0, 1.0]))


def test_a_real_defect_label_records_its_kind_patches_and_threshold(learner):
    rng = np.random.default_rng(1)
    emb = torch.from_numpy(rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32))
    region = np.zeros((64, 64), bool)
    region[0:16, 0:16] = True  # exactly 2 x 2 patches of 8 px, no ring
    th = learner.detector.thresholds.image if learner.detector.thresholds else None
    rec = learner.mark_defect(emb, region)
    assert rec.kind == "defect" and rec.patches == 4 and rec.threshold_before == th
    whole = learner.mark_defect(emb, None)
    assert whole.kind == "image_ng" and whole.patches == 16  # the hottest quarter of 64 patches


def test_channel_shares_are_each_channels_part_of_the_mahalanobis_distance(learner):
    from core.feedback import channel_shares
    from core.models.mahalanobis import unpack_symmetric

    det = learner.detector
    det.model.set_channel_weights(torch.tensor([1.0, 0.5, 2.0, 1.0]))
    rng = np.random.default_rng(2)
    emb = torch.from_numpy(rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32))
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2, 3] = mask[0, 5, 6] = True
    shares = channel_shares(det, emb, mask)
    # by hand, patch by patch: d_c = diff_c * (P diff)_c over the weighted embedding and mean
    w = det.model.channel_weights
    expected = []
    for r, c in ((2, 3), (5, 6)):
        mean, prec = det.model.gaussian_view(torch.tensor([r * 8 + c]))
        diff = emb[0, :, r, c] * w - mean[0] * w
        contrib = diff * (unpack_symmetric(prec, 4)[0] @ diff)
        expected.append(contrib / contrib.sum())
    torch.testing.assert_close(shares, torch.stack(expected).mean(0), rtol=1e-4, atol=1e-5)
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-5)


def test_a_whole_part_ok_is_recorded_as_such_and_a_region_as_a_false_alarm(learner):
    rng = np.random.default_rng(3)
    emb = torch.from_numpy(rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32))
    assert learner.mark_false_alarm(emb, None).kind == "image_ok"
    region = np.zeros((64, 64), bool)
    region[:8, :8] = True
    assert learner.mark_false_alarm(emb, region).kind == "false_alarm"


@pytest.mark.parametrize("reweight", [False, True])
def test_feedback_works_on_a_model_fitted_on_too_few_images_to_calibrate(reweight):
    det = Detector.create(DetectorConfig(weights="random", image_size=64, n_channels=4))
    rng = np.random.default_rng(4)
    det.model.partial_fit(torch.from_numpy(rng.normal(0, 1, (30, 4, 8, 8)).astype(np.float32)))
    det.finalize()
    assert det.thresholds is None
    learner = FeedbackLearner(det, reweight=reweight)
    learner.protect([torch.from_numpy(rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32))])
    fa = torch.from_numpy(rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32))
    fa[:, :, 2:4, 2:4] += 6.0  # a hot mark
    region = np.zeros((64, 64), bool)
    region[16:32, 16:32] = True
    rec = learner.mark_false_alarm(fa, region)
    # without a pixel threshold the memory takes the region's hotter half: the mark is learnt
    assert rec.score_after < rec.score_before and rec.threshold_after is None
