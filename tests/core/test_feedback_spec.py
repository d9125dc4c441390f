"""Feedback, specified where mutation testing found it unspecified (issue 18).

On synthetic PaDiM embeddings (8 channels, a 16 x 16 patch grid): what reweighting keeps, which
patches a false alarm puts into the position-free memory, what the block context changes, and
that the memory finds an accepted appearance among more blocks than its shortlist holds.
Behaviour only: public learner and memory calls, no private state.
"""
import numpy as np
import pytest
import torch

from core.detector import Detector, DetectorConfig
from core.feedback import FeedbackLearner
from core.feedback_memory import FeedbackMemory

C, SIZE, GRID = 8, 128, (16, 16)  # 8 map pixels per patch


def _background(rng, n, scale=1.0):
    return torch.from_numpy((scale * rng.normal(0, 1, (n, C, *GRID))).astype(np.float32))


def _fitted(train: torch.Tensor, held_out: torch.Tensor | None = None) -> Detector:
    det = Detector.create(DetectorConfig(weights="random", image_size=SIZE, n_channels=C))
    det.model.partial_fit(train)
    det.finalize()
    if held_out is not None:
        det.calibrate_on(held_out)
    return det


def _patches(r0, r1, c0, c1):
    """The map-pixel region covering patches rows r0..r1-1, cols c0..c1-1."""
    m = np.zeros((SIZE, SIZE), bool)
    m[r0 * 8 : r1 * 8, c0 * 8 : c1 * 8] = True
    return m


def _hot_channel_mark(base: torch.Tensor) -> torch.Tensor:
    """A false alarm carried by channel 0: what reweighting lowers."""
    e = base.clone()
    e[0, 0, 5:8, 5:8] += 8.0
    return e


def _held_out_median(det: Detector) -> float:
    return float(np.median(det.thresholds.calibration_scores))


def _unweighted(det: Detector) -> Detector:
    ref = det.copy()
    ref.model.set_channel_weights(None)
    ref.refresh_calibration()
    return ref


# -- reweighting keeps the OK parts' median score ----------------------------------------------
@pytest.mark.parametrize(("n_held_out", "held_out_scale"), [(40, 1.0), (40, 0.05), (1, 1.0)],
                         ids=["ordinary", "scores-below-1", "one-held-out-part"])
def test_reweighting_keeps_the_held_out_median_score_exactly(n_held_out, held_out_scale):
    """Lowering channels must not pass as an improvement by shrinking every score: the weights
    are rescaled so the held-out OK parts' median is what it is without them, whatever its
    size (below 1 too) and however few parts were held out (one too)."""
    rng = np.random.default_rng(0)
    det = _fitted(_background(rng, 200), _background(rng, n_held_out, held_out_scale))
    learner = FeedbackLearner(det, reweight=True)
    rec = learner.mark_false_alarm(_hot_channel_mark(_background(rng, 1)), _patches(4, 9, 4, 9))
    assert rec.weights is not None  # the channels were reweighted ...
    w = learner.detector.model.channel_weights
    assert float(w[0]) < float(w[1:].min())  # ... channel 0, which carried the false alarm, most
    unweighted = _unweighted(learner.detector)
    assert _held_out_median(learner.detector) == pytest.approx(_held_out_median(unweighted), rel=1e-5)
    if held_out_scale < 1:
        assert _held_out_median(unweighted) < 1.0


def test_held_out_parts_that_score_exactly_zero_stay_at_zero_and_the_label_still_applies():
    """OK parts identical to the model's mean score 0: there is no scale to keep (no division
    by a zero median), and the label is learnt all the same."""
    zeros = torch.zeros(200, C, *GRID)
    det = _fitted(zeros, torch.zeros(8, C, *GRID))
    assert _held_out_median(det) == 0.0
    learner = FeedbackLearner(det, reweight=True)
    rec = learner.mark_false_alarm(_hot_channel_mark(torch.zeros(1, C, *GRID)), _patches(4, 9, 4, 9))
    assert rec.weights is not None and rec.score_after < rec.score_before
    assert bool(torch.isfinite(learner.detector.model.channel_weights).all())
    assert _held_out_median(learner.detector) == 0.0


# -- which patches the memory accepts -----------------------------------------------------------
def _accepted(memory: FeedbackMemory, emb: torch.Tensor, det: Detector) -> torch.Tensor:
    """(16, 16) bool: the patches of ``emb`` the memory takes for an accepted copy (gate 0)."""
    dist = det.model.score(emb)
    return memory.apply(emb, dist)[0] == 0


def test_without_thresholds_a_region_accepts_its_patches_at_half_its_peak_distance_or_more():
    """A model too small to calibrate has no pixel threshold: the memory then takes the
    clicked region's patches whose model distance is at least half the region's peak (and
    nothing outside the region, however hot)."""
    rng = np.random.default_rng(1)
    det = _fitted(_background(rng, 60))
    assert det.thresholds is None
    e = _background(rng, 1)
    e[0, :, 5:8, 5:8] += torch.linspace(1.0, 4.0, 9).reshape(3, 3)  # a mark with a gradient of heat
    e[0, :, 9, 6] += 4.0  # a hot patch just outside the outline: never part of the label
    d = det.model.score(e)[0]
    inside = torch.zeros(GRID, dtype=torch.bool)
    inside[4:9, 4:9] = True  # the clicked outline: 5 x 5 patches
    expected = inside & (d >= 0.5 * d[inside].max())
    assert 1 < int(expected.sum()) < int(inside.sum())  # some of the region, not all of it
    assert float(d[9, 6]) > 0.5 * float(d[inside].max())
    learner = FeedbackLearner(det)
    learner.mark_false_alarm(e, _patches(4, 9, 4, 9))
    assert torch.equal(_accepted(learner.detector.memory, e, det), expected)


@pytest.fixture
def mark_in_a_wide_outline():
    """A hot 3 x 3 mark on a quiet part, clicked with a 7 x 7 outline around it; and a probe:
    the same mark on another quiet part (the outline's cool margin different too)."""
    rng = np.random.default_rng(2)
    det = _fitted(_background(rng, 200), _background(rng, 40))
    mark = torch.from_numpy(rng.normal(0, 1, (C, 3, 3)).astype(np.float32)) + 6.0
    e, probe = _background(rng, 1, 0.3), _background(rng, 1, 0.3)
    e[0, :, 6:9, 6:9] = probe[0, :, 6:9, 6:9] = mark
    the_mark = torch.zeros(GRID, dtype=torch.bool)
    the_mark[6:9, 6:9] = True
    return det, e, probe, _patches(4, 11, 4, 11), the_mark


def test_with_accepted_block_context_the_mark_is_recognised_whatever_surrounds_it(mark_in_a_wide_outline):
    det, e, probe, outline, the_mark = mark_in_a_wide_outline
    learner = FeedbackLearner(det, block_context="accepted")
    learner.mark_false_alarm(e, outline)
    assert torch.equal(_accepted(learner.detector.memory, e, det), the_mark)  # the mark, not its margin
    assert torch.equal(_accepted(learner.detector.memory, probe, det), the_mark)


def test_with_region_block_context_the_outlines_margin_is_part_of_the_appearance(mark_in_a_wide_outline):
    det, e, probe, outline, the_mark = mark_in_a_wide_outline
    learner = FeedbackLearner(det)  # block_context="region", the default
    learner.mark_false_alarm(e, outline)
    assert torch.equal(_accepted(learner.detector.memory, e, det), the_mark)
    centre = torch.zeros(GRID, dtype=torch.bool)
    centre[7, 7] = True  # the only patch of the mark whose block holds nothing of the margin
    assert torch.equal(_accepted(learner.detector.memory, probe, det), centre)


# -- a memory larger than its shortlist -----------------------------------------------------------
def test_an_accepted_patch_is_found_among_more_blocks_than_the_shortlist_holds():
    """64 accepted patches (no two adjacent), all multiples a x v of one feature vector v
    (a = 0.3, 0.325, ... 1.875); a query equal to v (a = 1) must shortlist that exact block by
    centre-patch distance, not blocks with a larger or smaller projection on v. The shortlist
    holds 16."""
    rng = np.random.default_rng(3)
    v = torch.from_numpy(rng.normal(0, 1, C).astype(np.float32))
    scales = 0.3 + 0.025 * torch.arange(64)
    emb = torch.zeros(1, C, *GRID)
    accept = torch.zeros(GRID, dtype=torch.bool)
    for i, a in enumerate(scales):
        r, c = 2 * (i // 8), 2 * (i % 8)  # every other patch: each block holds one accepted patch
        emb[0, :, r, c] = a * v
        accept[r, c] = True
    mem = FeedbackMemory(GRID, C)
    assert mem.shortlist < int(accept.sum())
    assert mem.add(emb, accept) == 64
    query = torch.zeros(1, C, *GRID)
    query[0, :, 9, 9] = scales[28] * v  # a = 1.0: a copy of one accepted patch, elsewhere
    gated = mem.apply(query, torch.ones(1, *GRID))[0]
    assert float(scales[28]) == 1.0 and float(gated[9, 9]) == 0.0  # recognised
    gated[9, 9] = 1.0
    assert bool((gated == 1.0).all())  # nothing else
