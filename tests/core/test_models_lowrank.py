"""Semi-orthogonal PaDiM against a numpy reference; incremental update equals refit."""
import numpy as np
import torch

from core import CancelToken, fit_job, load_detector, run_job, save_detector
from core.models.lowrank import LowRankPadimModel, semi_orthogonal
from core.models.padim import PadimModel


def reference(w: np.ndarray, train: np.ndarray, test: np.ndarray, eps: float) -> np.ndarray:
    n, c, h, wd = train.shape
    out = np.zeros((test.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            z = train[:, :, i, j] @ w
            mu = z.mean(0)
            inv = np.linalg.inv(np.cov(z.T) + eps * np.eye(w.shape[1]))
            for b in range(test.shape[0]):
                d = test[b, :, i, j] @ w - mu
                out[b, i, j] = np.sqrt(d @ inv @ d)
    return out


def test_projection_is_semi_orthogonal_seeded_and_identity_at_full_rank():
    w = semi_orthogonal(20, 6, seed=1).double()
    torch.testing.assert_close(w.T @ w, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(semi_orthogonal(20, 6, seed=1), semi_orthogonal(20, 6, seed=1))
    assert not torch.allclose(semi_orthogonal(20, 6, seed=1), semi_orthogonal(20, 6, seed=2))
    torch.testing.assert_close(semi_orthogonal(5, 9, seed=0), torch.eye(5))


def test_scores_match_the_numpy_reference():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (30, 12, 2, 3)).astype(np.float32)
    test = rng.normal(0, 1.5, (4, 12, 2, 3)).astype(np.float32)
    model = LowRankPadimModel((2, 3), 12, rank=5, epsilon=0.01, seed=3)
    model.partial_fit(torch.from_numpy(train[:11]))
    model.partial_fit(torch.from_numpy(train[11:]))
    got = model.score(torch.from_numpy(test)).numpy()
    w = model.projection.numpy().astype(np.float64)
    np.testing.assert_allclose(got, reference(w, train.astype(np.float64), test, 0.01), rtol=2e-4)


def test_full_rank_is_plain_padim():
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.normal(0, 1, (20, 6, 2, 2)).astype(np.float32))
    probe = torch.from_numpy(rng.normal(0, 1, (3, 6, 2, 2)).astype(np.float32))
    low = LowRankPadimModel((2, 2), 6, rank=100)
    low.partial_fit(train)
    padim = PadimModel((2, 2), 6)
    padim.partial_fit(train)
    torch.testing.assert_close(low.score(probe), padim.score(probe))


def test_incremental_and_masked_updates_equal_a_refit():
    rng = np.random.default_rng(2)
    first, later = (torch.from_numpy(rng.normal(0, 1, (n, 10, 3, 3)).astype(np.float32)) for n in (15, 4))
    probe = torch.from_numpy(rng.normal(0, 1, (2, 10, 3, 3)).astype(np.float32))
    mask = torch.from_numpy(rng.random((4, 3, 3)) < 0.5)
    inc = LowRankPadimModel((3, 3), 10, rank=4)
    inc.partial_fit(first)
    inc.finalize()
    inc.score(probe)
    inc.partial_fit(later, mask)
    inc.finalize()
    full = LowRankPadimModel((3, 3), 10, rank=4)
    full.partial_fit(torch.cat([first, later]), torch.cat([torch.ones(15, 3, 3, dtype=torch.bool), mask]))
    full.finalize()
    torch.testing.assert_close(inc.score(probe), full.score(probe), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inc.mean_x, full.mean_x)
    # channel weights: ones change nothing, and the weighted path agrees between the two
    base = inc.score(probe)
    inc.set_channel_weights(torch.ones(10))
    torch.testing.assert_close(inc.score(probe), base, rtol=1e-5, atol=1e-5)
    w = torch.linspace(0.2, 1.0, 10)
    inc.set_channel_weights(w)
    full.set_channel_weights(w)
    torch.testing.assert_close(inc.score(probe), full.score(probe), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(inc.score(probe), base)


def test_save_load_round_trip_with_all_channels(tiny_config, part_images, tmp_path):
    ok, ng = part_images
    cfg = tiny_config.with_(model="padim-lowrank", n_channels=None, model_params={"rank": 16})
    det = run_job(fit_job(ok, cfg, CancelToken())).detector
    assert det.model.n_channels == det.embedder.n_channels > 16 and det.model.k == 16
    back = load_detector(save_detector(det, tmp_path / "m.okng"))
    from core.imageio import load_image
    imgs = [load_image(p) for p in ng + ok[:2]]
    emb = det.embed(imgs)
    torch.testing.assert_close(back.model.score(emb), det.model.score(emb), rtol=0, atol=0)
    assert [r.score for r in back.inspect(imgs)] == [r.score for r in det.inspect(imgs)]
