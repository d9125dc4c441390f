"""Feedback that generalises (issue 11): a benign appearance accepted once is accepted wherever
it shows up next; confirmed defects stay defects; reweighting never passes an NG part; the
memory lives in the model file."""
import json

import numpy as np
import pytest
import torch

from core.detector import Detector, DetectorConfig
from core.feedback import FeedbackLearner
from core.feedback_memory import FeedbackMemory

C, SIZE = 8, 128  # 8 channels, 16 x 16 patch grid


def _background(rng, n):
    return torch.from_numpy(rng.normal(0, 1, (n, C, 16, 16)).astype(np.float32))


def _pattern(rng, scale=2.5):
    """A 3 x 3-patch appearance (C, 3, 3): a 'stamp' in feature space."""
    return torch.from_numpy(rng.normal(0, scale, (C, 3, 3)).astype(np.float32))


def _with(emb, pattern, row, col, rng, jitter=0.3):
    e = emb.clone()
    noise = torch.from_numpy(rng.normal(0, jitter, pattern.shape).astype(np.float32))
    e[0, :, row : row + 3, col : col + 3] = pattern + noise
    return e


def _region(row, col):
    """The map-pixel outline an operator clicks around a pattern at patch (row, col)."""
    m = np.zeros((SIZE, SIZE), bool)
    m[row * 8 : (row + 3) * 8, col * 8 : (col + 3) * 8] = True
    return m


@pytest.fixture
def detector():
    """PaDiM on synthetic embeddings, calibrated on 40 held-out synthetic OK images."""
    det = Detector.create(DetectorConfig(weights="random", image_size=SIZE, n_channels=C))
    assert det.model.grid == (16, 16)
    rng = np.random.default_rng(0)
    det.model.partial_fit(_background(rng, 200))
    det.finalize()
    det.calibrate_on(_background(rng, 40))
    return det


def _score(det, emb):
    return float(det.maps_and_scores(emb)[1][0])


def test_an_accepted_pattern_is_accepted_at_other_positions_and_a_different_one_is_not(detector):
    rng = np.random.default_rng(1)
    stamp, other = _pattern(rng), _pattern(rng)
    th = detector.thresholds.image
    learner = FeedbackLearner(detector)
    for row, col in ((2, 2), (10, 4)):  # two prints of the stamp, clicked as false alarms
        e = _with(_background(rng, 1), stamp, row, col, rng)
        assert _score(learner.detector, e) > th
        rec = learner.mark_false_alarm(e, _region(row, col))
        assert rec.score_after < th  # the clicked region itself falls below the threshold
    det = learner.detector
    for row, col in ((6, 11), (12, 12), (1, 9)):  # the stamp where it was never clicked
        e = _with(_background(rng, 1), stamp, row, col, rng)
        assert _score(detector, e) > th  # the clean model flags it ...
        assert _score(det, e) < th  # ... the memory does not
        d = _with(_background(rng, 1), other, row, col, rng)
        assert _score(det, d) > th  # a different appearance is still a defect


def test_a_click_on_something_else_does_not_undo_an_earlier_click(detector):
    """Two false alarms that look nothing alike (neither recurs: each was seen once): each
    clicked part stays below the threshold after the other click. A click that does not
    recur still stands for exact copies of what was clicked (the operator's own part,
    inspected again)."""
    rng = np.random.default_rng(21)
    th = detector.thresholds.image
    learner = FeedbackLearner(detector)
    first = _with(_background(rng, 1), _pattern(rng), 2, 2, rng)
    second = _with(_background(rng, 1), _pattern(rng), 10, 9, rng)
    assert learner.mark_false_alarm(first, _region(2, 2)).score_after < th
    assert learner.mark_false_alarm(second, _region(10, 9)).score_after < th
    memory = learner.detector.memory
    assert not memory.scale.any()  # neither click recurs: exact copies only
    assert _score(learner.detector, first) < th and _score(learner.detector, second) < th
    assert _score(learner.detector, _with(_background(rng, 1), _pattern(rng), 2, 2, rng)) > th


def test_radius_limits_where_an_appearance_is_accepted(detector):
    rng = np.random.default_rng(2)
    stamp = _pattern(rng)
    learner = FeedbackLearner(detector, memory_params={"radius": 2})
    for row, col in ((2, 2), (3, 3), (2, 4), (4, 2)):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, row, col, rng), _region(row, col))
    near, far = (_with(_background(rng, 1), stamp, r, c, rng) for r, c in ((3, 2), (12, 12)))
    assert _score(learner.detector, near) < 0.8 * _score(detector, near)  # near: lowered
    assert _score(learner.detector, far) == _score(detector, far)  # far: untouched


def test_a_confirmed_defect_is_never_accepted_by_the_memory(detector):
    rng = np.random.default_rng(3)
    stamp = _pattern(rng)
    learner = FeedbackLearner(detector)
    for row, col in ((2, 2), (10, 4), (4, 12), (12, 7)):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, row, col, rng), _region(row, col))
    probe = _with(_background(rng, 1), stamp, 6, 10, rng)
    th = learner.detector.thresholds.image
    assert _score(learner.detector, probe) < th
    # the engineer says: this appearance, here, is a real defect
    learner.mark_defect(_with(_background(rng, 1), stamp, 12, 12, rng, jitter=0.1), _region(12, 12))
    assert _score(learner.detector, probe) > th
    assert learner.undo()  # and undo takes the defect label back
    assert _score(learner.detector, probe) < th


def test_memory_gate_is_on_the_model_scale_and_learnt_from_the_clicks():
    """One click alone teaches only that exact look; the radius comes from the spread of two."""
    rng = np.random.default_rng(4)
    mem = FeedbackMemory((16, 16), C)
    stamp = _pattern(rng)
    accept = torch.zeros(16, 16, dtype=torch.bool)
    accept[2:5, 2:5] = True
    first = _with(_background(rng, 1), stamp, 2, 2, rng)
    mem.add(first, accept)
    dist = torch.full((1, 16, 16), 10.0)
    assert float(mem.apply(first, dist)[0, 3, 3]) == 0.0  # the clicked patch itself
    other = _with(_background(rng, 1), stamp, 2, 2, rng)
    assert float(mem.apply(other, dist)[0, 3, 3]) == 10.0  # no spread learnt yet
    mem.add(other, accept)
    assert bool((mem.scale > 0).all())
    third = _with(_background(rng, 1), stamp, 2, 2, rng)
    assert float(mem.apply(third, dist)[0, 3, 3]) < 10.0
    assert torch.equal(mem.apply(third, dist * 0), dist * 0)  # a factor: zero stays zero


def test_memory_round_trips_through_the_model_file_bit_exactly(detector, tmp_path):
    from core.persistence import load_detector, save_detector

    rng = np.random.default_rng(5)
    stamp = _pattern(rng)
    learner = FeedbackLearner(detector, memory_params={"radius": 5})
    for row, col in ((2, 2), (10, 4)):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, row, col, rng), _region(row, col))
    learner.mark_defect(_with(_background(rng, 1), _pattern(rng), 7, 7, rng), _region(7, 7))
    det = learner.detector
    back = load_detector(save_detector(det, tmp_path / "m.okng"), extractor=det.extractor)
    assert back.memory is not None and back.memory.params() == det.memory.params()
    for k, v in det.memory.tensors().items():
        assert torch.equal(back.memory.tensors()[k], v), k
    probe = torch.cat([_with(_background(rng, 1), stamp, 6, 8, rng) for _ in range(3)])
    np.testing.assert_array_equal(back.maps_and_scores(probe)[1], det.maps_and_scores(probe)[1])
    copy = det.copy()  # copies are independent
    copy.memory.add(probe[:1], torch.ones(16, 16, dtype=torch.bool))
    assert len(copy.memory) > len(det.memory)


def test_a_format_1_model_file_still_loads(detector, tmp_path):
    from safetensors.torch import load_file, save_file

    from core.persistence import load_detector, read_model_file, save_detector

    path = save_detector(detector, tmp_path / "old.okng")
    meta, _ = read_model_file(path)
    tensors = load_file(str(path))
    meta["format_version"] = 1
    del meta["feedback_memory"]
    save_file(tensors, str(path), metadata={"okng": json.dumps(meta)})
    back = load_detector(path, extractor=detector.extractor)
    assert back.memory is None


def test_what_reweighting_learnt_is_saved_with_the_model_checked_on_load_and_taken_up_by_a_learner(
        detector, tmp_path):
    from core.errors import ModelFileError
    from core.persistence import load_detector, read_model_file, save_detector, write_model_file

    rng = np.random.default_rng(5)
    learner = FeedbackLearner(detector, reweight=True)
    learner.mark_false_alarm(_with(_background(rng, 1), _pattern(rng), 3, 3, rng), _region(3, 3))
    learner.mark_defect(_with(_background(rng, 1), _pattern(rng), 9, 9, rng), _region(9, 9))
    ev = learner.detector.feedback_evidence
    assert ev["fa_shares"].shape == (1, C) and ev["defect_embeddings"].shape == (1, C, 16, 16)
    path = save_detector(learner.detector, tmp_path / "m.okng")
    back = load_detector(path, extractor=detector.extractor)
    assert back.feedback_evidence.keys() == ev.keys()
    assert all(torch.equal(back.feedback_evidence[k], ev[k]) for k in ev)
    again = FeedbackLearner(back, reweight=True)
    assert len(again.fa_shares) == len(again.defect_shares) == len(again.defect_embeddings) == 1
    assert torch.equal(again.defect_embeddings[0], learner.defect_embeddings[0])
    learner.undo()
    learner.undo()
    assert learner.detector.feedback_evidence is None  # the undone labels' evidence goes too
    meta, tensors = read_model_file(path)
    tensors["feedback_evidence.fa_shares"] = tensors["feedback_evidence.fa_shares"][:, :3]
    write_model_file(path, tensors, meta)
    with pytest.raises(ModelFileError, match="feedback evidence 'fa_shares'"):
        load_detector(path, extractor=detector.extractor)
    assert load_detector(save_detector(detector, tmp_path / "plain.okng"),
                         extractor=detector.extractor).feedback_evidence is None


def test_a_click_that_changes_only_the_memory_rescores_the_held_out_parts_without_the_model(detector):
    """After a false-alarm or defect click the held-out OK parts are re-scored (the expected
    false-alarm rate stays true), and when only the memory changed, from the model distances
    kept from before: the same scores as a full re-scoring, without running the model on
    them again (PatchCore's clicks took 1.6 s doing that). A click that changes the model
    (the position-tied update) re-scores them through it."""
    rng = np.random.default_rng(13)
    stamp = _pattern(rng)
    learner = FeedbackLearner(detector)
    learner.mark_false_alarm(_with(_background(rng, 1), stamp, 2, 2, rng), _region(2, 2))
    held = detector.calibration_embeddings.shape[0]
    calls = []
    score = type(detector.model).score

    def counting(model, emb):
        calls.append(int(emb.shape[0]))
        return score(model, emb)

    import unittest.mock as mock
    with mock.patch.object(type(detector.model), "score", counting):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, 9, 5, rng), _region(9, 5))
        learner.mark_defect(_with(_background(rng, 1), _pattern(rng), 6, 6, rng), _region(6, 6))
    assert sum(calls) < held  # only the clicked images themselves went through the model
    det = learner.detector
    np.testing.assert_array_equal(det.thresholds.calibration_scores, det.calibration_scores()[0])
    np.testing.assert_array_equal(det.thresholds.calibration_peaks, det.calibration_scores()[1])
    assert len(det.memory) > 0 and det.memory.n_defect_blocks > 0

    learner.position_update = True  # the same learner, its distances cached: now the model moves
    calls.clear()
    with mock.patch.object(type(detector.model), "score", counting):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, 4, 9, rng), _region(4, 9))
    assert sum(calls) >= held  # the model changed: the held-out parts went through it
    after = learner.detector
    np.testing.assert_array_equal(after.thresholds.calibration_scores, after.calibration_scores()[0])


def test_reweighting_never_passes_a_part_judged_ng(detector):
    rng = np.random.default_rng(6)
    fa = _background(rng, 1)
    fa[:, 4] += 6.0  # channel 4 alone makes this good part look abnormal
    ng = _background(rng, 1)
    ng[0, 4, 5:8, 5:8] += 9.0  # a real defect that shows (mostly) in channel 4
    th = detector.thresholds.image
    assert _score(detector, ng) > th

    def click(protect):
        learner = FeedbackLearner(detector.copy(), reweight=True, generalise=False)
        if protect:
            assert learner.protect(ng) == 1
        return learner, learner.mark_false_alarm(fa, np.ones((SIZE, SIZE), bool))

    unguarded, record = click(protect=False)
    assert unguarded.detector.model.channel_weights is not None and record.guard is None
    assert _score(unguarded.detector, ng) < unguarded.detector.thresholds.image  # the failure
    guarded, record = click(protect=True)
    assert _score(guarded.detector, ng) > guarded.detector.thresholds.image
    assert record.guard is not None and record.guard.parts == (0,)  # it says what it kept NG
    assert record.guard.refused[0] == 1.0 and record.guard.defects == 0
    if record.weights is not None:  # the strength it took is the first it did not refuse
        assert record.weights.strength not in record.guard.refused


def test_gaussian_view_is_public_for_padim_and_absent_for_patchcore(detector):
    idx = torch.tensor([0, 17, 255])
    mean, prec = detector.model.gaussian_view(idx)
    assert mean.shape == (3, C) and prec.shape == (3, C * (C + 1) // 2)
    torch.testing.assert_close(mean, detector.model.stats.mean[idx].float())
    from core.models import PatchcoreModel

    assert PatchcoreModel((4, 4), C).gaussian_view(idx[:1]) is None


def test_simulation_reports_defects_flipped(tiny_config, part_images):
    from core import CancelToken, fit_job, run_job
    from core.simulate import simulate_feedback_job

    ok, ng = part_images
    det = run_job(fit_job(ok, tiny_config, CancelToken())).detector
    res = run_job(simulate_feedback_job(det, ng + ok[:3], ok[3:], ng, [1, 2], CancelToken())).to_dict()
    cps = res["checkpoints"]
    assert cps[0]["clicks"] == 0 and cps[0]["defects_flipped"] == 0
    for c in cps:
        assert {"clicks", "false_alarm_rate", "detection_rate", "auroc", "fpr_at_95_tpr", "threshold",
                "pool_images_seen", "defects_flipped"} <= set(c)
    # clicking the defective images themselves as "false alarms" must show up as flips
    assert cps[-1]["clicks"] >= 1 and cps[-1]["defects_flipped"] >= 1
    assert json.dumps(res)


def test_the_pool_runs_out_only_when_it_ends_before_the_last_checkpoint(tiny_config, part_images):
    """Reaching the last checkpoint's clicks on the pool's last image is not running out;
    ending a click short is. A negative click count is refused at the command line."""
    from core import CancelToken, fit_job, run_job
    from core.cli import main
    from core.simulate import simulate_feedback_job

    ok, ng = part_images
    det = run_job(fit_job(ok, tiny_config, CancelToken())).detector
    one = ng[:1]  # one flagged part: one click
    assert run_job(simulate_feedback_job(det.copy(), one, ok[3:], ng, [1], CancelToken())).pool_exhausted is False
    short = run_job(simulate_feedback_job(det.copy(), one, ok[3:], ng, [1, 2], CancelToken()))
    assert short.pool_exhausted and short.checkpoints[-1].clicks == 1
    assert main(["simulate-feedback", "--model", "nope.okng", "--pool", *one, "--ok", *ok[3:], "--ng", *ng,
                 "--clicks", "-5"]) == 2


def _match_at(ratios: dict[tuple[int, int], float], blocked: tuple[tuple[int, int], ...] = (), image: int = 0):
    """A memory match of looked-up patches at grid cells with these ratios (ramp 1.0-1.3)."""
    from core.feedback_memory import MemoryMatch

    cells = list(ratios)
    ratio = torch.tensor([ratios[c] for c in cells])
    factor = ((ratio - 1.0) / 0.3).clamp(0, 1)
    acc = torch.ones(len(cells))
    neg = torch.tensor([0.5 if c in blocked else float("inf") for c in cells])
    idx = torch.tensor([r * 16 + c for r, c in cells])
    return MemoryMatch(factor, ratio, acc, neg), torch.full((len(cells),), image), idx, cells


def test_a_print_is_lowered_as_a_whole_from_its_confident_core():
    """Hysteresis: hot patches matching within ``grow`` and connected to a confident match
    (ratio <= low) fall to 0; the same ratio elsewhere only gets the ramp."""
    mem = FeedbackMemory((16, 16), C, low=1.0, high=1.3, grow=1.2)
    m, img, idx, cells = _match_at({
        (4, 4): 0.9,  # the print's core: a confident match
        (4, 5): 1.15, (5, 6): 1.1,  # its margin; a diagonal step connects
        (5, 7): 1.25,  # beyond grow: keeps its ramp factor ...
        (5, 8): 1.1,  # ... and does not pass the connection on
        (10, 10): 1.15,  # the same ratio with no confident match next to it
        (3, 3): 1.1,  # next to the core, but a confirmed defect's block is nearer
    }, blocked=((3, 3),))
    factor = dict(zip(cells, mem._grown(m, img, idx, (16, 16)).tolist()))
    assert factor[(4, 4)] == factor[(4, 5)] == factor[(5, 6)] == 0.0
    assert factor[(5, 7)] == pytest.approx(0.25 / 0.3)
    assert factor[(5, 8)] == pytest.approx(0.1 / 0.3)
    assert factor[(10, 10)] == pytest.approx(0.15 / 0.3)
    assert factor[(3, 3)] == pytest.approx(0.1 / 0.3)  # left as the match set it


def test_prints_do_not_connect_across_images_of_a_batch():
    from core.feedback_memory import MemoryMatch

    mem = FeedbackMemory((16, 16), C, grow=1.2)
    a, ia, xa, _ = _match_at({(4, 4): 0.9}, image=0)
    b, ib, xb, _ = _match_at({(4, 5): 1.15}, image=1)
    both = MemoryMatch(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in
                         ("factor", "ratio", "accepted_distance", "defect_distance")))
    factor = mem._grown(both, torch.cat([ia, ib]), torch.cat([xa, xb]), (16, 16))
    assert factor.tolist() == [0.0, pytest.approx(0.5)]


def test_connected_matches_are_saved_and_old_model_files_load_without_them(detector, tmp_path):
    from core.persistence import load_detector, read_model_file, save_detector, write_model_file

    with pytest.raises(ValueError, match="grow"):
        FeedbackMemory((16, 16), C, low=1.0, grow=0.9)
    rng = np.random.default_rng(7)
    stamp = _pattern(rng)
    learner = FeedbackLearner(detector, memory_params={"grow": 1.25})
    for row, col in ((2, 2), (10, 4)):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, row, col, rng), _region(row, col))
    path = save_detector(learner.detector, tmp_path / "m.okng")
    assert load_detector(path, extractor=detector.extractor).memory.grow == 1.25
    meta, tensors = read_model_file(path)
    del meta["feedback_memory"]["grow"]  # a file written before connected matches existed
    write_model_file(path, tensors, meta)
    old = load_detector(path, extractor=detector.extractor).memory
    assert old.grow is None and len(old) == len(learner.detector.memory)  # scored exactly as it was


def _one_click_memory(cells: list[tuple[int, int]], **params) -> FeedbackMemory:
    """A memory holding one click's accepted blocks at these grid cells (all distinctive)."""
    mem = FeedbackMemory((16, 16), C, **params)
    n = len(cells)
    mem.load_tensors({"blocks": torch.zeros(n, 9, C), "valid": torch.ones(n, 9, dtype=torch.bool),
                      "pos": torch.tensor(cells, dtype=torch.int64), "click": torch.zeros(n, dtype=torch.int64),
                      "loo": torch.ones(n, 1), "ok_dist": torch.full((n, 1), 2.0), "neg_blocks": torch.zeros(0, 9, C),
                      "neg_valid": torch.zeros(0, 9, dtype=torch.bool), "n_clicks": torch.tensor([1])})
    return mem


def test_inside_a_matched_prints_outline_the_whole_ramp_is_lowered_fully():
    """A confident match at patch (8, 8) on the block clicked at (2, 2), the corner of a click
    covering (2..4, 2..4), outlines the new print at (8..10, 8..10), widened by one patch to
    (7..11): there every hot patch up to ``footprint`` (1.3) falls to 0, connected or not;
    outside it, and above 1.3, the ramp stands; a confirmed defect's block stays as the match
    set it."""
    click = [(r, c) for r in range(2, 5) for c in range(2, 5)]
    mem = _one_click_memory(click, low=1.0, high=1.3, grow=1.2, footprint=1.3)
    m, img, idx, cells = _match_at({
        (8, 8): 0.9,  # the confident match, on block (2, 2)
        (11, 11): 1.28,  # the widened outline's far corner, not connected within grow: taken
        (7, 10): 1.25,  # its near edge
        (6, 9): 1.25,  # one row before it: the ramp
        (12, 12): 1.28,  # outside: the ramp
        (9, 10): 1.35,  # inside, but past footprint: unchanged
        (10, 8): 1.2,  # inside, a confirmed defect's block is nearer
    }, blocked=((10, 8),))
    m.best = torch.full((len(cells),), click.index((2, 2)))
    factor = dict(zip(cells, mem._grown(m, img, idx, (16, 16)).tolist()))
    assert factor[(8, 8)] == factor[(11, 11)] == factor[(7, 10)] == 0.0
    assert factor[(6, 9)] == pytest.approx(0.25 / 0.3)
    assert factor[(12, 12)] == pytest.approx(0.28 / 0.3)
    assert factor[(9, 10)] == 1.0
    assert factor[(10, 8)] == pytest.approx(0.2 / 0.3)
    off = _one_click_memory(click, low=1.0, high=1.3, grow=1.2, footprint=None)  # outline off
    factor = dict(zip(cells, off._grown(m, img, idx, (16, 16)).tolist()))
    assert factor[(11, 11)] == pytest.approx(0.28 / 0.3) and factor[(8, 8)] == 0.0


def test_an_outline_covers_the_matched_print_not_every_patch_of_its_click():
    """A whole "part is OK" click accepts scattered hot patches: a match on one of them
    outlines the print that block belongs to (its click's patches connected to it, one-patch
    gaps bridged), not the far-away others, which would zero whatever lies under them."""
    blob = [(r, c) for r in range(2, 5) for c in range(2, 5)]
    gap = [(2, 6)]  # one patch apart from the blob: the same print
    far = [(12, 12), (12, 13), (13, 12)]  # elsewhere on the part: another print of the click
    cells = blob + gap + far
    mem = _one_click_memory(cells, low=1.0, high=1.3, grow=None, footprint=1.3)
    m, img, idx, queried = _match_at({
        (5, 5): 0.9,  # a confident match on block (2, 2): the print moves by (3, 3)
        (7, 7): 1.25,  # the blob's far corner, moved: taken
        (5, 9): 1.25,  # the bridged patch (2, 6), moved: taken
        (15, 15): 1.25,  # the far patches, moved: not this print's
    })
    m.best = torch.full((len(queried),), cells.index((2, 2)))
    factor = dict(zip(queried, mem._grown(m, img, idx, (16, 16)).tolist()))
    assert factor[(5, 5)] == factor[(7, 7)] == factor[(5, 9)] == 0.0
    assert factor[(15, 15)] == pytest.approx(0.25 / 0.3)


@pytest.mark.parametrize("footprint", [1.3, None])
@pytest.mark.parametrize("seed", range(6))
def test_compiled_growth_and_outlines_lower_exactly_the_patches_the_numpy_version_lowers(seed, footprint,
                                                                                        monkeypatch):
    """Growth and outlines run compiled (one pass per image); without numba the numpy version
    (connected components, moved prints, a dilation) runs instead. Both lower the same
    patches, on random prints, matches and batches of two images, with outlines and without."""
    import core.feedback_memory as fm
    from core.feedback_memory import MemoryMatch

    assert fm._compiled() is not None
    rng = np.random.default_rng(seed)
    cells = sorted({(int(r), int(c)) for r, c in rng.integers(0, 16, (30, 2))})  # scattered: several prints
    mem = _one_click_memory(cells, low=1.0, high=1.3, grow=1.2, footprint=footprint)
    n = 120
    img = torch.from_numpy(np.repeat([0, 1], n // 2))  # each image's patches looked up once, as _apply does
    idx = torch.from_numpy(np.concatenate([rng.choice(256, n // 2, replace=False) for _ in range(2)]))
    ratio = torch.from_numpy(rng.uniform(0.7, 1.5, n).astype(np.float32))
    neg = torch.from_numpy(np.where(rng.random(n) < 0.1, 0.5, np.inf).astype(np.float32))
    m = MemoryMatch(((ratio - 1.0) / 0.3).clamp(0, 1), ratio, torch.ones(n), neg,
                    torch.from_numpy(rng.integers(0, len(cells), n)), torch.from_numpy(rng.random(n) < 0.8))
    compiled = mem._grown(m, img, idx, (16, 16))
    monkeypatch.setattr(fm, "_compiled", lambda: None)
    reference = mem._grown(m, img, idx, (16, 16))
    assert int((reference == 0).sum()) > int((m.factor == 0).sum())  # growth and outlines did lower some
    torch.testing.assert_close(compiled, reference)


def test_the_shortlist_selection_on_a_long_row_skips_chunks_without_changing_the_result():
    """On a memory's long rows the selection first ranks chunks of 16 columns by their minimum
    and reads only those that can hold one of the k smallest: the same values and columns,
    ties still to the lower column, NaN and inf still last."""
    from core.feedback_memory import _compiled, _smallest

    assert _compiled() is not None
    rng = np.random.default_rng(4)
    d = rng.integers(0, 60, (30, 2004)).astype(np.float32)  # many ties
    d[rng.random(d.shape) < 0.05] = np.nan
    d[rng.random(d.shape) < 0.05] = np.inf
    d[3, :1990] = np.inf  # fewer finite values than chunks ranked: the whole row is read
    d[4] = np.nan
    for k in (1, 16, 40):
        val, idx = _smallest(torch.from_numpy(d), k)
        as_inf = np.where(np.isnan(d), np.inf, d)
        order = np.lexsort((np.broadcast_to(np.arange(d.shape[1]), d.shape), as_inf))[:, :k]  # value, then column
        assert np.array_equal(idx.numpy(), order)
        assert np.array_equal(val.numpy(), np.take_along_axis(as_inf, order, 1))


def test_only_blocks_of_the_mark_itself_start_a_match():
    """A block whose prints are no nearer to each other than to ordinary OK patches (the
    margin a click also covers, loo >= ok_dist) neither lowers a patch on its own nor starts
    a print; the mark's own blocks (loo < ok_dist) do. Unknown distances count as the mark."""
    three = _one_click_memory([(2, 2), (2, 3), (2, 4)])
    three.ok_dist = torch.tensor([[2.0], [0.8], [-1.0]])  # mark, margin, unknown (loo 1 each)
    assert three.distinct_blocks().tolist() == [True, False, True]
    q = torch.zeros(3, 9, C)
    q[:, :, 0] = torch.tensor([0.9, 0.9, 1.15])[:, None]  # block distance = ratio to a zero block
    qv, pos = torch.ones(3, 9, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.int64)

    def mark_and_margin(**params):
        """One recurring click: its mark block far from the queries, its margin block at 0."""
        mem = _one_click_memory([(2, 2), (2, 3)], **params)
        mem.blocks[0] += 10.0
        mem.ok_dist = torch.tensor([[2.0], [0.8]])
        return mem

    on = mark_and_margin()
    assert on.scale.tolist() == [[1.0], [1.0]]  # the click recurs: both blocks have a radius
    m = on.match(q, qv, pos)
    assert m.best.tolist() == [1, 1, 1] and m.distinct.tolist() == [False] * 3
    assert m.factor.tolist() == [1.0, 1.0, 1.0]  # the margin alone lowers nothing
    assert mark_and_margin(distinct=False).match(q, qv, pos).factor.tolist() == [0.0, 0.0, pytest.approx(0.5)]
    mark = mark_and_margin()
    mark.blocks = mark.blocks.flip(0).contiguous()  # the near block is now the mark's own
    assert mark.match(q, qv, pos).factor.tolist() == [0.0, 0.0, pytest.approx(0.5)]
    # nor does a margin block's confident match start a print that grows
    grown, img, idx, cells = _match_at({(4, 4): 0.9, (4, 5): 1.1})
    grown.distinct = torch.tensor([False, True])
    assert on._grown(grown, img, idx, (16, 16))[1] == pytest.approx(0.1 / 0.3)
    grown.distinct = torch.tensor([True, True])
    assert on._grown(grown, img, idx, (16, 16))[1] == 0.0
    # with two stages, a block is the mark's only where it is in every stage
    staged = FeedbackMemory((16, 16), C, channel_groups=[0] * 4 + [1] * 4)
    staged.blocks, staged.click = torch.zeros(2, 9, C), torch.zeros(2, dtype=torch.int64)  # one click
    staged.loo, staged.ok_dist = torch.ones(2, 2), torch.tensor([[2.0, 2.0], [2.0, 0.5]])
    assert staged.distinct_blocks().tolist() == [True, False]


def test_print_outlines_and_distinct_blocks_are_saved_and_old_files_load_without_them(detector, tmp_path):
    from core.persistence import load_detector, read_model_file, save_detector, write_model_file

    with pytest.raises(ValueError, match="footprint"):
        FeedbackMemory((16, 16), C, low=1.0, footprint=0.9)
    rng = np.random.default_rng(8)
    stamp = _pattern(rng)
    learner = FeedbackLearner(detector, memory_params={"footprint": 1.35, "distinct": False})
    for row, col in ((2, 2), (10, 4)):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, row, col, rng), _region(row, col))
    path = save_detector(learner.detector, tmp_path / "m.okng")
    back = load_detector(path, extractor=detector.extractor).memory
    assert (back.footprint, back.distinct) == (1.35, False)
    meta, tensors = read_model_file(path)
    meta["feedback_memory"]["distinct"] = 1  # a number is not a yes/no
    write_model_file(path, tensors, meta)
    with pytest.raises(Exception, match="distinct"):
        load_detector(path, extractor=detector.extractor)
    del meta["feedback_memory"]["footprint"], meta["feedback_memory"]["distinct"]  # an older file
    write_model_file(path, tensors, meta)
    old = load_detector(path, extractor=detector.extractor).memory
    assert (old.footprint, old.distinct) == (None, False)
    assert FeedbackMemory((16, 16), C).params()["footprint"] == 1.3 and FeedbackMemory((16, 16), C).distinct


def test_the_compiled_shortlist_gives_the_block_distances_of_the_gathered_blocks():
    from core.feedback_memory import _compiled, block_distances, shortlist_block_distances

    assert _compiled() is not None  # numba is required: a broken kernel must not pass unnoticed
    g = torch.Generator().manual_seed(8)
    q, m = torch.randn(7, 9, 12, generator=g), torch.randn(30, 9, 12, generator=g)
    qv, mv = torch.rand(7, 9, generator=g) > 0.3, torch.rand(30, 9, generator=g) > 0.3
    idx = torch.randint(0, 30, (7, 5), generator=g)
    groups = [slice(0, 5), slice(5, 12)]
    fast = shortlist_block_distances(q, qv, m, mv, idx, groups)
    torch.testing.assert_close(fast, block_distances(q, qv * 1 > 0, m[idx], mv[idx], groups), rtol=1e-5, atol=1e-5)
    interleaved = [torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])]  # not contiguous: the tensor path
    torch.testing.assert_close(shortlist_block_distances(q, qv, m, mv, idx, interleaved),
                               block_distances(q, qv, m[idx], mv[idx], interleaved))


def test_the_compiled_shortlist_selection_picks_the_k_smallest_in_order():
    """The shortlist's selection (compiled) gives what a top-k gives: the k smallest of each
    row, ascending, with their columns; rows with infinities and k = the row length too."""
    from core.feedback_memory import _compiled, _smallest

    assert _compiled() is not None
    g = torch.Generator().manual_seed(9)
    d = torch.randn(40, 300, generator=g)
    d[3, ::2] = float("inf")  # a radius leaves only some columns allowed
    d[5] = float("inf")
    d[7, 10] = float("nan")  # an embedding holding inf or NaN: ranked last, as torch does
    for k in (1, 16, 300):
        val, idx = _smallest(d, k)
        ref_val, _ = d.topk(k, dim=1, largest=False)
        nan_last = torch.nan_to_num(ref_val, nan=float("inf"), posinf=float("inf"))  # reported as +inf
        torch.testing.assert_close(val, nan_last)
        gathered = torch.nan_to_num(torch.gather(d, 1, idx), nan=float("inf"), posinf=float("inf"))
        torch.testing.assert_close(gathered, val)
        finite = torch.isfinite(val)
        assert all(len(set(r[f].tolist())) == int(f.sum()) for r, f in zip(idx, finite))  # no column twice
    row = torch.tensor([[5.0, float("nan"), 1.0, 0.0]])
    assert _smallest(row, 2)[0].tolist() == [[0.0, 1.0]]
    assert _smallest(row, 4)[1][0, :3].tolist() == [3, 2, 0]  # NaN as +inf: after every finite value
    with pytest.raises(RuntimeError):  # more than the row holds: refused as a top-k refuses it
        _smallest(row, 5)


def test_the_compiled_best_match_search_agrees_with_the_full_search_up_to_the_cutoff(monkeypatch):
    """Scoring's search drops a shortlisted block as soon as it cannot beat the best so far
    (or the cutoff): the same best block, ratio and distance wherever the ratio is at most
    the cutoff; nothing found above it (the gate factor is 1 there either way)."""
    import core.feedback_memory as fm

    assert fm._compiled() is not None
    g = torch.Generator().manual_seed(3)
    mem = FeedbackMemory((16, 16), 12, channel_groups=[0] * 5 + [1] * 7, shortlist=6)
    mem.blocks, mem.valid = torch.randn(40, 9, 12, generator=g), torch.rand(40, 9, generator=g) > 0.2
    mem.pos, mem.click = torch.zeros(40, 2, dtype=torch.int64), torch.arange(40) % 4
    mem.loo = torch.rand(40, 2, generator=g) * 4 + 2
    mem.loo[:3] = 0.0  # blocks with no spread: exact copies only
    mem.ok_dist, mem.n_clicks = torch.full((40, 2), -1.0), 4
    # queries: copies, near prints (ratios around the ramp), and strangers
    base = mem.blocks[torch.arange(60) % 40]
    q = base + torch.randn(60, 9, 12, generator=g) * torch.linspace(0, 6.0, 60)[:, None, None]
    q[:2] = mem.blocks[:2]  # exact copies of radius-0 blocks
    qv = torch.rand(60, 9, generator=g) > 0.2
    pos = torch.zeros(60, 2, dtype=torch.int64)
    fast = mem.match(q, qv, pos)
    monkeypatch.setattr(fm, "_contiguous_bounds", lambda groups: None)  # the full tensor search
    full = mem.match(q, qv, pos)
    cutoff = max(mem.high, mem.grow, mem.footprint)
    inside = full.ratio <= cutoff
    assert 10 <= int(inside.sum()) <= 50 and bool(inside[:2].all())  # both kinds are exercised
    torch.testing.assert_close(fast.ratio[inside], full.ratio[inside])
    torch.testing.assert_close(fast.accepted_distance[inside], full.accepted_distance[inside])
    torch.testing.assert_close(fast.factor, full.factor)
    assert torch.equal(fast.distinct[inside], full.distinct[inside])
    assert bool(torch.isinf(fast.ratio[~inside]).all())


def test_the_compiled_gathering_of_query_blocks_is_the_numpy_gathering():
    """Scoring gathers its query blocks in one compiled pass over the channels-first
    embeddings: the same cells, zeros off the grid, for any step and images of a batch."""
    import core.feedback_memory as fm

    assert fm._compiled() is not None
    emb = torch.from_numpy(np.random.default_rng(5).normal(size=(2, C, 6, 7)).astype(np.float32))
    img = np.array([0, 0, 1, 1, 1, 0], np.int64)
    idx = np.array([0, 6, 41, 20, 35, 13], np.int64)  # corners, edges and the inside
    for step in (1, 2):
        q, qv = fm._query_blocks(emb, img, idx, step)
        ref_q, ref_v = fm._gather_blocks(emb, torch.from_numpy(img), torch.from_numpy(idx), step)
        assert torch.equal(q, ref_q) and torch.equal(qv, ref_v)


def test_a_region_accepted_and_then_confirmed_a_defect_is_never_lowered():
    """The same patches marked a false alarm and then a real defect: the defect blocks tie
    the accepted ones, and a tie blocks. Both totals are summed the same way (a compiled sum
    rounded differently and let 3 of 64 patches of the confirmed defect fall to 0), with
    several stages as the station's memories have."""
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(size=(1, 12, 16, 16)).astype(np.float32))
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[4:12, 4:12] = True
    mem = FeedbackMemory((16, 16), 12, channel_groups=[0] * 4 + [1] * 4 + [2] * 4, grow=None, footprint=None)
    mem.add(emb, region)
    mem.add_defect(emb, region)
    again = emb + torch.from_numpy(rng.normal(size=emb.shape).astype(np.float32)) * 1e-5  # embedded again
    dist = torch.from_numpy(rng.uniform(1, 2, size=(1, 16, 16)).astype(np.float32))
    assert torch.equal(mem.apply(again, dist), dist)


def test_the_search_sees_valid_cells_replaced_after_a_first_match():
    """The compiled search keeps numpy views of the blocks between images; a memory whose
    valid cells (or blocks, scale, mark flags) are replaced is searched as it now is."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(40, 9, 12, generator=g)
    qv = torch.ones(40, 9, dtype=torch.bool)

    def memory() -> FeedbackMemory:
        mem = FeedbackMemory((16, 16), 12, channel_groups=[0] * 5 + [1] * 7, shortlist=6)
        mem.blocks, mem.valid = q + 0.3 * torch.randn(40, 9, 12, generator=g), torch.ones(40, 9, dtype=torch.bool)
        mem.pos, mem.click = torch.zeros(40, 2, dtype=torch.int64), torch.arange(40) % 4
        mem.loo, mem.ok_dist, mem.n_clicks = torch.full((40, 2), 1.0), torch.full((40, 2), -1.0), 4
        return mem

    mem = memory()
    fresh = FeedbackMemory((16, 16), 12, channel_groups=[0] * 5 + [1] * 7, shortlist=6)
    fresh.load_tensors({k: v.clone() for k, v in mem.tensors().items()})
    first = mem.match(q, qv, None)
    mem.valid = fresh.valid = torch.zeros(40, 9, dtype=torch.bool)  # only the centres count now
    after = mem.match(q, qv, None)
    assert not torch.equal(after.accepted_distance, first.accepted_distance)
    assert torch.equal(after.accepted_distance, fresh.match(q, qv, None).accepted_distance)


# -- specified after mutation round 6 (issue 18): settings, look-up limits, click bookkeeping ---
def _every_patch_accepted(emb: torch.Tensor, **params) -> FeedbackMemory:
    """A memory of one click that accepted every patch of ``emb`` (1, C, h, w): with one click
    there is no spread yet, so exactly the copies of these patches are lowered to 0."""
    mem = FeedbackMemory(tuple(emb.shape[-2:]), emb.shape[1], **params)
    mem.add(emb, torch.ones(emb.shape[-2:], dtype=torch.bool))
    return mem


def test_patches_below_the_look_up_floor_keep_the_models_distance():
    """Only patches whose model distance reaches ``floor`` (0.9) x the pixel threshold are
    looked up: below it a patch keeps its distance, even an exact copy of an accepted one.
    Without a pixel threshold there is no floor."""
    emb = _background(np.random.default_rng(9), 1)
    mem = _every_patch_accepted(emb)
    dist = torch.full((1, 16, 16), 8.5)
    dist[0, :8] = 9.5  # the top half reaches 0.9 x 10
    out = mem.apply(emb, dist, pixel_threshold=10.0)
    assert bool((out[0, :8] == 0).all())  # looked up: copies, lowered
    assert torch.equal(out[0, 8:], dist[0, 8:])  # under the floor: as the model scored them
    assert bool((mem.apply(emb, dist) == 0).all())


def test_by_default_the_256_hottest_patches_of_an_image_are_looked_up():
    """README, "What feedback buys": up to 256 hot patches per image are looked up. On a
    20 x 20 grid the 144 cooler patches keep the model's distance, copies or not."""
    emb = torch.randn(1, C, 20, 20, generator=torch.Generator().manual_seed(10))
    mem = _every_patch_accepted(emb)
    dist = torch.arange(1, 401, dtype=torch.float32).reshape(1, 20, 20)  # all different
    out, hot = mem.apply(emb, dist).flatten(), dist.flatten() > 400 - 256
    assert bool((out[hot] == 0).all())
    assert torch.equal(out[~hot], dist.flatten()[~hot])


def test_the_smallest_settings_are_valid_and_below_them_refused():
    """One candidate, a shortlist of one, step 1, floor 0, low 0 and radius 0 are settings a
    recipe may hold (a shortlist of one still finds an exact copy); below them, refused."""
    emb = _background(np.random.default_rng(11), 1)
    mem = _every_patch_accepted(emb, radius=0, low=0.0, candidates=1, shortlist=1, step=1, floor=0.0)
    assert (mem.radius, mem.low, mem.candidates, mem.shortlist, mem.step, mem.floor) == (0, 0.0, 1, 1, 1, 0.0)
    dist = torch.ones(1, 16, 16)
    dist[0, 7, 9] = 2.0  # the one candidate
    assert float(mem.apply(emb, dist)[0, 7, 9]) == 0.0
    for bad in ({"radius": -1}, {"low": -0.1}, {"low": 1.3, "grow": None}, {"candidates": 0},
                {"shortlist": 0}, {"step": 0}, {"floor": -0.1}):
        with pytest.raises(ValueError):
            FeedbackMemory((16, 16), C, **bad)


def test_the_memory_counts_its_clicks():
    """``n_clicks`` (saved in the model file) counts the false-alarm clicks that added
    blocks: none at first, not a click that accepts nothing, not a confirmed defect."""
    rng = np.random.default_rng(12)
    mem = FeedbackMemory((16, 16), C)
    assert mem.n_clicks == 0 and int(mem.tensors()["n_clicks"]) == 0
    accept = torch.zeros(16, 16, dtype=torch.bool)
    accept[2:5, 2:5] = True
    assert mem.add(_background(rng, 1), accept) == 9 and mem.n_clicks == 1
    assert mem.add(_background(rng, 1), torch.zeros(16, 16, dtype=torch.bool)) == 0 and mem.n_clicks == 1
    assert mem.add_defect(_background(rng, 1), accept) == 9 and mem.n_clicks == 1
    assert mem.add(_background(rng, 1), accept) == 9 and mem.n_clicks == 2
    assert int(mem.tensors()["n_clicks"]) == 2 and int(mem.copy().n_clicks) == 2


def test_a_click_is_recurring_when_its_median_mark_block_is_nearer_to_other_prints_than_to_ok():
    """A click's radius counts (recurring appearance) when the median over its mark's blocks
    of ``max_stage r / ok_dist`` is below 1: one block of the mark that is nearer to ordinary
    OK patches than to other prints does not veto it, a minority that is nearer to other
    prints does not make a rare texture recurring (its radii are then 0: exact copies only)."""
    mem = FeedbackMemory((16, 16), C, channel_groups=[0] * 4 + [1] * 4)
    loo = torch.tensor([[0.5, 0.4], [0.6, 0.5], [0.5, 2.0],  # click 0: 2 of 3 nearer to prints
                        [2.0, 0.5], [0.5, 3.0], [0.4, 0.5]])  # click 1: 1 of 3
    n = loo.shape[0]
    mem.load_tensors({"blocks": torch.zeros(n, 9, C), "valid": torch.ones(n, 9, dtype=torch.bool),
                      "pos": torch.zeros(n, 2, dtype=torch.int64), "click": torch.tensor([0, 0, 0, 1, 1, 1]),
                      "loo": loo, "ok_dist": torch.ones(n, 2), "neg_blocks": torch.zeros(0, 9, C),
                      "neg_valid": torch.zeros(0, 9, dtype=torch.bool), "n_clicks": torch.tensor([2])})
    assert torch.equal(mem.scale, torch.cat([loo[:3], torch.zeros(3, 2)]))


# -- specified after mutation round 7 (seed 19, after outlines and mark blocks) -------------
def test_a_memory_on_a_grid_that_is_not_square_keeps_rows_and_columns_apart():
    """A 4 x 6 patch grid: clicked positions are (row, column) of that grid, and a copy of
    an accepted patch is found at its own place."""
    rng = np.random.default_rng(14)
    emb = torch.from_numpy(rng.normal(0, 1, (1, C, 4, 6)).astype(np.float32))
    mem = FeedbackMemory((4, 6), C)
    assert mem.grid == (4, 6)
    accept = torch.zeros(4, 6, dtype=torch.bool)
    accept[3, 5] = True
    mem.add(emb, accept)
    assert mem.pos.tolist() == [[3, 5]]
    dist = torch.ones(1, 4, 6)
    dist[0, 3, 5] = 2.0
    out = mem.apply(emb, dist)
    assert float(out[0, 3, 5]) == 0.0 and float(out.sum()) == 23.0


def test_each_stage_learns_its_radius_from_its_own_nearest_other_click():
    """The leave-one-click-out radius is per stage: a block's radius in a stage is its
    distance to the nearest block of another click *in that stage*, which may be a different
    block in each stage; a new click updates the older blocks' radii the same way."""
    mem = FeedbackMemory((5, 5), 2, channel_groups=[0, 1], shortlist=4)

    def click(*features):
        """One click accepting patches (1, 1), (3, 3), ... (not neighbours: each block is its
        centre alone) with these (stage 0, stage 1) features."""
        e = torch.zeros(1, 2, 5, 5)
        accept = torch.zeros(5, 5, dtype=torch.bool)
        for k, f in enumerate(features):
            e[0, :, 1 + 2 * k, 1 + 2 * k] = torch.tensor(f)
            accept[1 + 2 * k, 1 + 2 * k] = True
        mem.add(e, accept, region=accept)

    click((0.0, 0.0))  # block 0
    click((1.0, 9.0), (9.0, 1.0))  # blocks 1 and 2: each near block 0 in one stage only
    # block 0: stage 0's nearest is block 1, stage 1's is block 2
    torch.testing.assert_close(mem.loo, torch.tensor([[1.0, 1.0], [1.0, 9.0], [9.0, 1.0]]))


def test_the_look_up_product_uses_pytorchs_threads_only_where_its_cnn_keeps_them_busy(detector, monkeypatch):
    """With the PyTorch runtime the CNN's thread pool is awake anyway, so the memory's
    centre-patch product may use it; with ONNX Runtime or OpenVINO it runs on the calling
    thread and the search splits over a worker of the memory's own (waking PyTorch's pool
    leaves its threads spinning on the cores the next image needs). Either way the scores
    are the same."""
    rng = np.random.default_rng(5)
    learner = FeedbackLearner(detector)
    e = _with(_background(rng, 1), _pattern(rng), 4, 4, rng)
    learner.mark_false_alarm(e, _region(4, 4))
    det = learner.detector
    seen = []
    apply = det.memory.apply
    monkeypatch.setattr(det.memory, "apply",
                        lambda *a, **kw: seen.append((a[-1], kw.get("pipeline", False))) or apply(*a, **kw))
    monkeypatch.setenv("OKNG_NUM_THREADS", "2")
    torch_scores = det.distances(e)
    det._runtime = object()  # another runtime embeds
    other_scores = det.distances(e)
    monkeypatch.setenv("OKNG_NUM_THREADS", "1")  # one core: nothing to split over
    one_core = det.distances(e)
    assert seen == [(torch.get_num_threads(), False), (1, True), (1, False)]
    assert torch.equal(torch_scores, other_scores) and torch.equal(torch_scores, one_core)


def test_the_search_split_over_two_cores_finds_what_one_core_finds(detector):
    """Many looked-up patches (here: every patch of four images, the highest 256 of each):
    the rows split between this thread and the worker give every distance bit for bit."""
    import core.feedback_memory as fm

    if fm._compiled() is None:
        pytest.skip("numba unavailable: no compiled search to split")
    rng = np.random.default_rng(8)
    learner = FeedbackLearner(detector)
    stamp = _pattern(rng)
    for y, x in ((2, 3), (9, 5), (5, 10)):
        learner.mark_false_alarm(_with(_background(rng, 1), stamp, y, x, rng), _region(y, x))
    mem = learner.detector.memory
    emb = torch.cat([_with(_background(rng, 1), stamp, y, x, rng) for y, x in ((3, 3), (8, 8), (4, 11), (11, 2))])
    dist = learner.detector.model.score(emb)
    rows = []
    search = mem._search
    mem._search = lambda *a: rows.append(a[0].shape[0]) or search(*a)
    one = mem.apply(emb, dist, None, 1, pipeline=False)
    two = mem.apply(emb, dist, None, 1, pipeline=True)
    assert rows[0] >= 2 * fm.PIPELINE_ROWS  # enough rows to split
    assert torch.equal(one, two) and not torch.equal(one, dist)  # the memory lowered some patches


def unload_memory_kernels(monkeypatch) -> None:
    """The feedback memory's compiled kernels as before anything loaded them (for this test)."""
    import core.feedback_memory as fm

    for name in ("_kernel", "_search_kernel", "_smallest_kernel", "_print_kernel", "_gather_kernel",
                 "_gate_kernel"):
        monkeypatch.setattr(fm, name, None)
    monkeypatch.setattr(fm, "_kernel_failed", False)


def test_warming_up_a_detector_loads_the_memory_kernels_before_the_first_click(detector, monkeypatch):
    """The first click must not pay numba's load (0.5 s from its cache, 4 s on a fresh
    install): the station's fit and load warm the memory's search up with the model."""
    import core.feedback_memory as fm

    unload_memory_kernels(monkeypatch)
    detector.warm_up()  # a line or a Ray worker: no clicks follow, nothing loaded for them
    assert fm._search_kernel is None
    detector.warm_up(feedback=True)
    assert fm._search_kernel is not None and fm._print_kernel is not None


def test_after_warming_up_a_click_and_scoring_compile_no_kernel_again(detector, monkeypatch):
    """numba compiles a kernel again for each new layout or type of its arguments: on a
    fresh install that is 1-2 s inside the operator's first click, after the warm-up meant
    to spare it. So every call after the warm-up passes C-contiguous arrays of the types the
    warm-up compiled, in scoring (batch 1 and 2) and in a click."""
    import numba

    import core.feedback_memory as fm

    detector.warm_up(feedback=True)
    calls = []

    def spying(name, kernel):
        def spy(*args):
            calls.append(name)
            bad = [i for i, a in enumerate(args) if isinstance(a, np.ndarray) and not a.flags.c_contiguous]
            assert not bad, f"{name}: arguments {bad} are not C-contiguous"
            assert tuple(numba.typeof(a) for a in args) in kernel.signatures, f"{name} would compile again"
            return kernel(*args)
        return spy

    for name in ("_kernel", "_search_kernel", "_smallest_kernel", "_print_kernel", "_gather_kernel",
                 "_gate_kernel"):
        monkeypatch.setattr(fm, name, spying(name, getattr(fm, name)))
    rng = np.random.default_rng(7)
    learner = FeedbackLearner(detector)
    pattern = _pattern(rng)
    learner.mark_false_alarm(_with(_background(rng, 1), pattern, 4, 4, rng), _region(4, 4))
    det = learner.detector
    again = torch.cat([_with(_background(rng, 1), pattern, 9, 2, rng), _with(_background(rng, 1), pattern, 1, 10, rng)])
    det.maps_and_scores(again[:1])
    det.maps_and_scores(again)
    learner.mark_false_alarm(again[1:], _region(1, 10))  # a click with a memory to search
    assert {"_search_kernel", "_gather_kernel", "_print_kernel", "_gate_kernel", "_kernel"} <= set(calls)


def test_a_protected_part_that_is_ok_under_the_updated_model_never_stops_reweighting(detector):
    """Protection keeps NG what is NG: a protected part that the label itself already passes
    (OK under the updated model with the previous weights) is no flip, whatever the weights
    do to it; the NG one among them still decides."""
    rng = np.random.default_rng(6)
    fa = _background(rng, 1)
    fa[:, 4] += 6.0
    ng = _background(rng, 1)
    ng[0, 4, 5:8, 5:8] += 9.0  # NG, and passed by the unguarded weights
    ok_parts = [_background(rng, 1) for _ in range(4)]
    th = detector.thresholds.image
    assert all(_score(detector, p) < th for p in ok_parts)

    def weights_after(protect):
        learner = FeedbackLearner(detector.copy(), reweight=True, generalise=False)
        learner.protect(protect)
        learner.mark_false_alarm(fa, np.ones((SIZE, SIZE), bool))
        w = learner.detector.model.channel_weights
        return None if w is None else w.clone()

    unguarded = weights_after([])
    assert unguarded is not None
    torch.testing.assert_close(weights_after(ok_parts), unguarded, rtol=0, atol=0)
    guarded = weights_after([ng])
    mixed = weights_after(ok_parts[:2] + [ng] + ok_parts[2:])
    assert (guarded is None) == (mixed is None)
    if guarded is not None:
        torch.testing.assert_close(mixed, guarded, rtol=0, atol=0)
    assert guarded is None or not torch.equal(guarded, unguarded)
