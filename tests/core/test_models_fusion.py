"""Stage fusion against per-stage numpy PaDiM references; Detector passes channel stages."""
import numpy as np
import pytest
import torch

from core import CancelToken, fit_job, load_detector, run_job, save_detector
from core.detector import Detector
from core.models.fusion import StageFusionModel


def stage_reference(train: np.ndarray, test: np.ndarray, eps: float) -> tuple[np.ndarray, float]:
    """(test distances (B, h, w), RMS in-sample training distance) for one stage, loops."""
    n, c, h, w = train.shape
    out, sq = np.zeros((test.shape[0], h, w)), []
    for i in range(h):
        for j in range(w):
            x = train[:, :, i, j]
            mu = x.mean(0)
            inv = np.linalg.inv(np.cov(x.T) + eps * np.eye(c))
            for b in range(test.shape[0]):
                d = test[b, :, i, j] - mu
                out[b, i, j] = np.sqrt(d @ inv @ d)
            sq += [(x[k] - mu) @ inv @ (x[k] - mu) for k in range(n)]
    return out, float(np.sqrt(np.mean(sq)))


def test_fused_map_matches_per_stage_references():
    rng = np.random.default_rng(0)
    stage = [0, 1, 1, 0, 2, 1, 2, 2, 2]
    train = rng.normal(0, 1, (25, 9, 2, 2)).astype(np.float32)
    train[:, 4:] *= 5.0  # a loud stage must not dominate after normalisation
    test = rng.normal(0, 1.5, (3, 9, 2, 2)).astype(np.float32)
    weights = [1.0, 2.0, 0.5]
    model = StageFusionModel((2, 2), 9, channel_stage=stage, stage_weights=weights, epsilon=0.01)
    model.partial_fit(torch.from_numpy(train[:10]))
    model.partial_fit(torch.from_numpy(train[10:]))
    got = model.score(torch.from_numpy(test)).numpy()
    ref = np.zeros_like(got, dtype=np.float64)
    for s, w in zip((0, 1, 2), weights):
        ch = [i for i, t in enumerate(stage) if t == s]
        d, typical = stage_reference(train[:, ch].astype(np.float64), test[:, ch], 0.01)
        ref += w * d / typical
        np.testing.assert_allclose(model.typical[s], typical, rtol=1e-5)
    np.testing.assert_allclose(got, ref / sum(weights), rtol=2e-4)


def test_incremental_update_equals_refit_and_weights_are_validated():
    rng = np.random.default_rng(1)
    stage = [0, 0, 1, 1, 1]
    first, later = (torch.from_numpy(rng.normal(0, 1, (n, 5, 2, 2)).astype(np.float32)) for n in (12, 5))
    probe = torch.from_numpy(rng.normal(0, 1, (2, 5, 2, 2)).astype(np.float32))
    inc = StageFusionModel((2, 2), 5, channel_stage=stage)
    inc.partial_fit(first)
    inc.score(probe)
    inc.partial_fit(later)
    inc.finalize()
    full = StageFusionModel((2, 2), 5, channel_stage=stage)
    full.partial_fit(torch.cat([first, later]))
    torch.testing.assert_close(inc.score(probe), full.score(probe), rtol=1e-5, atol=1e-5)
    base = inc.score(probe)
    inc.set_channel_weights(torch.ones(5))
    torch.testing.assert_close(inc.score(probe), base)
    inc.set_channel_weights(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))
    assert not torch.allclose(inc.score(probe), base)
    with pytest.raises(ValueError, match="stage_weights"):
        StageFusionModel((2, 2), 5, channel_stage=stage, stage_weights=[1.0])
    with pytest.raises(ValueError, match="channel_stage"):
        StageFusionModel((2, 2), 5, channel_stage=[0, 1])


def test_detector_passes_channel_stages_and_the_model_file_round_trips(tiny_config, part_images, tmp_path):
    ok, ng = part_images
    cfg = tiny_config.with_(model="padim-fusion", model_params={"stage_weights": [1.0, 3.0]})
    det = run_job(fit_job(ok, cfg, CancelToken())).detector
    assert det.model.channel_stage == det.embedder.channel_stage.tolist()
    assert len(det.model.stages) == 2 and "channel_stage" not in det.config.model_params
    back = load_detector(save_detector(det, tmp_path / "m.okng"))
    assert back.model.channel_stage == det.model.channel_stage and back.model.stage_weights == [1.0, 3.0]
    from core.imageio import load_image
    imgs = [load_image(p) for p in ng + ok[:2]]
    emb = det.embed(imgs)
    torch.testing.assert_close(back.model.score(emb), det.model.score(emb), rtol=0, atol=0)
    assert [r.score for r in back.inspect(imgs)] == [r.score for r in det.inspect(imgs)]
    # other models are created exactly as before
    assert not hasattr(Detector.create(tiny_config).model, "channel_stage")
