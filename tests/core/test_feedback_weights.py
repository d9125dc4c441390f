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
