"""Click-to-label feedback: exact memory updates, undo, reweighting guard, durable labels."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from core import CancelToken, fit_job, run_job
from core.feedback import FeedbackLearner, region_patch_mask
from core.labels import Label, LabelStore, RegionShape


@pytest.fixture
def fitted(tiny_config, part_images):
    ok, ng = part_images
    return run_job(fit_job(ok, tiny_config, CancelToken())).detector, ok, ng


def test_false_alarm_region_update_equals_a_refit_with_those_patches(fitted, part_images):
    from core.imageio import load_image

    det, ok, ng = fitted
    img = load_image(ng[0])
    mask = np.zeros((64, 64), bool)
    mask[8:24, 8:24] = True
    learner = FeedbackLearner(det, reweight=False, generalise=False)  # the model's own update alone
    learner.mark_false_alarm(img, mask)
    # from scratch: the same OK images plus exactly the marked patches of the image
    ref = det.copy()
    ref.model = type(det.model)(det.model.grid, det.model.n_channels, **det.model.params())
    from core.jobs import split_calibration

    fit_paths, _ = split_calibration(ok, det.config.calibration_fraction)  # what fit_job fitted
    ref.model.partial_fit(ref.embed([load_image(p) for p in fit_paths]))
    ref.model.partial_fit(ref.embed([img]), region_patch_mask(mask, det.model.grid))
    ref.finalize()
    probe = det.embed([img])
    torch.testing.assert_close(learner.detector.model.score(probe), ref.model.score(probe), rtol=1e-4, atol=1e-4)


def test_marking_a_region_lowers_its_score_and_leaves_the_original_detector_alone(fitted):
    from core.imageio import load_image

    det, _, ng = fitted
    img = load_image(ng[0])
    before = det.inspect([img])[0]
    learner = FeedbackLearner(det, reweight=False)
    rec = learner.mark_false_alarm(img, before.anomaly_map > 0.5 * before.peak)
    assert rec.score_after < 0.7 * rec.score_before
    assert det.inspect([img])[0].score == before.score  # snapshots, not in-place edits
    assert rec.threshold_after == rec.threshold_before  # the engineer's threshold stays
    assert rec.expected_false_alarm_rate is not None


def test_undo_restores_the_previous_model_exactly(fitted):
    from core.imageio import load_image

    det, _, ng = fitted
    img = load_image(ng[1])
    learner = FeedbackLearner(det, reweight=True)
    probe = det.embed([img])
    base = learner.detector.model.score(probe)
    learner.mark_false_alarm(img, None)
    learner.mark_false_alarm(img, None)
    assert not torch.equal(learner.detector.model.score(probe), base)
    assert learner.undo() and learner.undo() and not learner.undo()
    assert torch.equal(learner.detector.model.score(probe), base)
    assert learner.detector.thresholds.image == det.thresholds.image


def test_reweighting_never_hides_a_confirmed_defect(fitted):
    from core.imageio import load_image

    det, ok, ng = fitted
    learner = FeedbackLearner(det, reweight=True)
    defect = load_image(ng[2])
    learner.mark_defect(defect, None)
    for p in ng[:2]:  # marking other defects as false alarms pushes towards hiding defects
        learner.mark_false_alarm(load_image(p), None)
    d = learner.detector
    assert d.inspect([defect])[0].score > d.thresholds.image


def test_reweighting_lowers_channels_that_drive_false_alarms():
    from core.detector import Detector, DetectorConfig

    det = Detector.create(DetectorConfig(weights="random", image_size=64, n_channels=6))
    rng = np.random.default_rng(0)
    det.model.partial_fit(torch.from_numpy(rng.normal(0, 1, (30, 6, 8, 8)).astype(np.float32)))
    det.finalize()
    learner = FeedbackLearner(det, reweight=True)
    fa = torch.from_numpy(rng.normal(0, 1, (1, 6, 8, 8)).astype(np.float32))
    fa[:, 4] += 8.0  # channel 4 alone makes these look abnormal
    rec = learner.mark_false_alarm(fa, np.ones((64, 64), bool))
    w = learner.detector.model.channel_weights
    assert w is not None and int(torch.argmin(w)) == 4 and float(w[4]) < 0.6
    assert rec.weights is not None and rec.weights.lowest[0][1] == pytest.approx(float(w[4]))


def test_labels_round_trip_undo_and_export(tmp_path):
    mask = np.zeros((32, 32), bool)
    mask[4:9, 10:20] = True
    with LabelStore(tmp_path / "l.sqlite") as store:
        a = store.add(Label("p.png", "ab" * 32, "false_alarm", "model-1", "ana", RegionShape.from_mask(mask), 32, 7.5))
        store.add(Label("q.png", "cd" * 32, "image_ng", "model-1", "ana"))
        store.undo(a)
        assert [lab.kind for lab in store.labels()] == ["image_ng"]
        back = store.labels(include_undone=True)[0]
        assert np.array_equal(back.region.mask, mask) and back.region.bbox == (10, 4, 10, 5)
        assert "false_alarm" in store.export_csv() and '"undone_at"' in store.export_json()
    with pytest.raises(ValueError):
        Label("p.png", "x", "maybe", "m")


def test_labels_committed_before_a_kill_are_all_there(tmp_path):
    db = tmp_path / "labels.sqlite"
    code = (
        "import os, signal, sys\n"
        "from core.labels import Label, LabelStore\n"
        f"s = LabelStore({str(db)!r})\n"
        "for i in range(25):\n"
        "    s.add(Label(f'img{i}.png', 'h', 'image_ok', 'm'))\n"
        "print('acknowledged', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "acknowledged" in r.stdout and r.returncode == -9
    with LabelStore(db) as store:
        assert len(store.labels()) == 25


@pytest.mark.parametrize("model", ["padim", "padim-lowrank", "padim-fusion", "padim-kmeans", "patchcore"])
def test_every_model_learns_a_marked_false_alarm(tiny_config, part_images, model):
    from core.imageio import load_image

    ok, ng = part_images
    channels = None if model == "padim-lowrank" else tiny_config.n_channels
    det = run_job(fit_job(ok, tiny_config.with_(model=model, n_channels=channels), CancelToken())).detector
    img = load_image(ng[0])
    before = det.inspect([img])[0]
    rec = FeedbackLearner(det).mark_false_alarm(img, before.anomaly_map > 0.5 * before.peak)
    assert rec.score_after < 0.5 * rec.score_before
