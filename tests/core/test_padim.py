"""PaDiM against a brute-force per-patch numpy reference; incremental update equals refit."""
import numpy as np
import pytest
import torch

from core.models.padim import PadimModel


def brute_force_padim(train: np.ndarray, test: np.ndarray, eps: float) -> np.ndarray:
    """train (N, C, h, w), test (B, C, h, w) -> (B, h, w) distances, loop over patches."""
    n, c, h, w = train.shape
    out = np.zeros((test.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            x = train[:, :, i, j]
            mu = x.mean(0)
            cov = np.cov(x.T) + eps * np.eye(c)
            inv = np.linalg.inv(cov)
            for b in range(test.shape[0]):
                d = test[b, :, i, j] - mu
                out[b, i, j] = np.sqrt(d @ inv @ d)
    return out


def test_scores_match_brute_force_reference():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (30, 8, 3, 4)).astype(np.float32)
    test = rng.normal(0, 1.5, (5, 8, 3, 4)).astype(np.float32)
    model = PadimModel((3, 4), 8, epsilon=0.01)
    model.partial_fit(torch.from_numpy(train[:17]))
    model.partial_fit(torch.from_numpy(train[17:]))
    model.finalize()
    got = model.score(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(got, brute_force_padim(train.astype(np.float64), test, 0.01), rtol=2e-4)


def test_incremental_update_equals_refit_on_everything():
    rng = np.random.default_rng(1)
    first, later = (torch.from_numpy(rng.normal(0, 1, (n, 6, 2, 2)).astype(np.float32)) for n in (12, 5))
    probe = torch.from_numpy(rng.normal(0, 1, (3, 6, 2, 2)).astype(np.float32))
    inc = PadimModel((2, 2), 6)
    inc.partial_fit(first)
    inc.finalize()
    inc.score(probe)
    inc.partial_fit(later)  # after the model was already in use
    inc.finalize()
    full = PadimModel((2, 2), 6)
    full.partial_fit(torch.cat([first, later]))
    full.finalize()
    torch.testing.assert_close(inc.score(probe), full.score(probe), rtol=1e-5, atol=1e-5)


def test_a_probe_far_from_the_ok_data_scores_higher():
    rng = np.random.default_rng(2)
    model = PadimModel((2, 2), 4)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (40, 4, 2, 2)).astype(np.float32)))
    near = torch.zeros(1, 4, 2, 2)
    far = torch.full((1, 4, 2, 2), 6.0)
    assert (model.score(far) > 3 * model.score(near)).all()


def test_channel_weights_of_one_change_nothing_and_zero_weights_remove_a_channel():
    rng = np.random.default_rng(3)
    model = PadimModel((1, 1), 3)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (50, 3, 1, 1)).astype(np.float32)))
    probe = torch.tensor([[[[0.0]], [[0.0]], [[40.0]]]])
    base = model.score(probe)
    model.set_channel_weights(torch.ones(3))
    torch.testing.assert_close(model.score(probe), base)
    model.set_channel_weights(torch.tensor([1.0, 1.0, 0.0]))
    assert float(model.score(probe)) < float(base) / 10


def test_masked_update_refreshes_only_touched_patches_and_equals_a_full_finalize():
    rng = np.random.default_rng(4)
    model = PadimModel((3, 3), 5)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (20, 5, 3, 3)).astype(np.float32)))
    model.finalize()
    extra = torch.from_numpy(rng.normal(2, 1, (1, 5, 3, 3)).astype(np.float32))
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 1, 2] = True
    model.partial_fit(extra, mask)
    model.finalize()
    fresh = PadimModel((3, 3), 5)
    fresh.load_tensors(model.tensors())
    fresh.finalize()
    probe = torch.from_numpy(rng.normal(0, 1, (2, 5, 3, 3)).astype(np.float32))
    torch.testing.assert_close(model.score(probe), fresh.score(probe))
    assert model.stats.count.view(3, 3)[1, 2] == 21 and model.stats.count.view(3, 3)[0, 0] == 20


def neighbourhood_mean(x: np.ndarray, n: int) -> np.ndarray:
    """(N, C, h, w) -> each patch replaced by the mean of the patches within n // 2 rows and
    columns of it (only those that exist), by loops."""
    r = n // 2
    out = np.zeros_like(x)
    h, w = x.shape[2:]
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = x[:, :, max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].mean((2, 3))
    return out


def test_with_a_neighbourhood_the_gaussians_describe_each_patch_averaged_with_its_neighbours():
    rng = np.random.default_rng(5)
    train = rng.normal(0, 1, (40, 5, 4, 5)).astype(np.float32)
    test = rng.normal(0, 1.5, (3, 5, 4, 5)).astype(np.float32)
    model = PadimModel((4, 5), 5, epsilon=0.01, neighbourhood=3)
    model.partial_fit(torch.from_numpy(train))
    model.finalize()
    want = brute_force_padim(neighbourhood_mean(train, 3).astype(np.float64), neighbourhood_mean(test, 3), 0.01)
    np.testing.assert_allclose(model.score(torch.from_numpy(test)).numpy(), want, rtol=2e-4)
    assert model.params() == {"epsilon": 0.01, "neighbourhood": 3}


def test_a_single_odd_patch_heats_its_neighbours_only_with_a_neighbourhood():
    rng = np.random.default_rng(6)
    train = torch.from_numpy(rng.normal(0, 1, (60, 4, 5, 5)).astype(np.float32))
    probe = torch.zeros(1, 4, 5, 5)
    probe[0, :, 2, 2] = 8.0
    plain, pooled = PadimModel((5, 5), 4), PadimModel((5, 5), 4, neighbourhood=3)
    for m in (plain, pooled):
        m.partial_fit(train)
    d_plain, d_pooled = plain.score(probe)[0], pooled.score(probe)[0]
    ring = torch.ones(5, 5, dtype=torch.bool)
    ring[1:4, 1:4] = False  # beyond the odd patch's 3 x 3 neighbourhood
    assert d_plain[2, 2] > 3 * d_plain[1, 1] and d_pooled[1, 1] > 3 * d_plain[1, 1]
    torch.testing.assert_close(d_pooled[ring], pooled.score(torch.zeros(1, 4, 5, 5))[0][ring])


def test_masked_update_and_channel_weights_work_on_the_averaged_features():
    rng = np.random.default_rng(7)
    first, later = (torch.from_numpy(rng.normal(0, 1, (n, 3, 3, 3)).astype(np.float32)) for n in (15, 4))
    mask = torch.zeros(4, 3, 3, dtype=torch.bool)
    mask[:, 0, 0] = True
    probe = torch.from_numpy(rng.normal(0, 1, (2, 3, 3, 3)).astype(np.float32))
    inc = PadimModel((3, 3), 3, neighbourhood=3)
    inc.partial_fit(first)
    inc.finalize()
    inc.partial_fit(later, mask)
    inc.finalize()
    # the masked patch's Gaussian holds the averaged features of all 19 parts, the others of 15
    avg_first, avg_later = (neighbourhood_mean(x.numpy(), 3).astype(np.float64) for x in (first, later))
    masked = np.concatenate([avg_first[:, :, 0, 0], avg_later[:, :, 0, 0]])
    np.testing.assert_allclose(inc.stats.mean[0].numpy(), masked.mean(0), rtol=1e-5)
    np.testing.assert_allclose(inc.stats.mean[4].numpy(), avg_first[:, :, 1, 1].mean(0), rtol=1e-5)
    want = brute_force_padim(avg_first, neighbourhood_mean(probe.numpy(), 3), 0.01)
    np.testing.assert_allclose(inc.score(probe)[:, 1:, 1:].numpy(), want[:, 1:, 1:], rtol=2e-4)  # untouched patches
    # weights act per channel on what the Gaussians describe
    w = torch.tensor([1.0, 0.0, 1.0])
    inc.set_channel_weights(w)
    torch.testing.assert_close(inc.weighted(probe), inc.features(probe) * w.view(1, -1, 1, 1))


def test_an_even_or_zero_neighbourhood_is_refused():
    from core.detector import DetectorConfig

    for n in (0, 2):
        with pytest.raises(ValueError, match="neighbourhood"):
            PadimModel((2, 2), 3, neighbourhood=n)
    with pytest.raises(ValueError, match="neighbourhood must be odd"):
        DetectorConfig(model="padim", model_params={"neighbourhood": 4})


def test_feedback_explains_a_distance_in_the_averaged_features_the_model_scores():
    from types import SimpleNamespace

    from core.feedback import channel_shares
    from core.models.mahalanobis import unpack_symmetric

    rng = np.random.default_rng(8)
    model = PadimModel((4, 4), 3, neighbourhood=3)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (30, 3, 4, 4)).astype(np.float32)))
    model.finalize()
    emb = torch.from_numpy(rng.normal(0, 2, (1, 3, 4, 4)).astype(np.float32))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    shares = channel_shares(SimpleNamespace(model=model), emb, mask)
    x = torch.from_numpy(neighbourhood_mean(emb.numpy(), 3))[0, :, 1, 2]
    mean, prec = model.gaussian_view(torch.tensor([1 * 4 + 2]))
    diff = x - mean[0]
    contrib = diff * (unpack_symmetric(prec, 3)[0] @ diff)
    torch.testing.assert_close(shares, contrib / contrib.sum(), rtol=1e-4, atol=1e-6)
    assert float(contrib.sum().sqrt()) == pytest.approx(float(model.score(emb)[0, 1, 2]), rel=1e-4)
