"""Streaming Gaussian statistics: equal to a one-shot numpy fit, mergeable, masked, regularised."""
import numpy as np
import pytest
import torch

from core.models.gaussian import GaussianStats, precision_from_covariance


def numpy_cov(x: np.ndarray, eps: float) -> np.ndarray:
    """x (P, N, C) -> (P, C, C) unbiased covariance + eps I, one patch at a time."""
    return np.stack([np.cov(x[p].T, bias=False) + eps * np.eye(x.shape[2]) for p in range(x.shape[0])])


def test_streamed_batches_equal_one_shot_numpy_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (5, 37, 6))
    stats = GaussianStats.empty(5, 6)
    for lo in range(0, 37, 8):
        stats.update(torch.from_numpy(x[:, lo : lo + 8]))
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.covariance(0.01).numpy(), numpy_cov(x, 0.01), rtol=1e-10, atol=1e-12)


def test_merge_of_two_accumulators_equals_fitting_everything():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(0, 1, (3, 20, 4)))
    a, b, whole = (GaussianStats.empty(3, 4) for _ in range(3))
    a.update(x[:, :7])
    b.update(x[:, 7:])
    whole.update(x)
    a.merge(b)
    torch.testing.assert_close(a.scatter, whole.scatter)
    torch.testing.assert_close(a.mean, whole.mean)


def test_masked_update_counts_only_the_marked_patches():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(0, 1, (2, 10, 3)))
    weight = torch.zeros(2, 10)
    weight[0, :6] = 1  # patch 0 gets 6 samples, patch 1 none
    stats = GaussianStats.empty(2, 3)
    stats.update(x, weight)
    assert stats.count.tolist() == [6.0, 0.0]
    np.testing.assert_allclose(stats.mean[0].numpy(), x[0, :6].mean(0).numpy())
    assert float(stats.scatter[1].abs().max()) == 0.0


def test_one_sample_gives_epsilon_identity_not_nan():
    stats = GaussianStats.empty(4, 5)
    stats.update(torch.ones(4, 1, 5))
    cov = stats.covariance(0.01)
    assert torch.isfinite(cov).all()
    torch.testing.assert_close(cov, 0.01 * torch.eye(5, dtype=torch.float64).expand(4, 5, 5))


@pytest.mark.parametrize("channels", [10, 100, 176, 300])
def test_precision_is_the_inverse_at_every_channel_count(channels):
    """176 and 300 channels hit a oneMKL batched-inverse bug with torch.linalg.inv."""
    rng = np.random.default_rng(channels)
    x = rng.normal(0, 1, (6, channels // 2, channels))  # fewer samples than channels
    stats = GaussianStats.empty(6, channels)
    stats.update(torch.from_numpy(x))
    cov = stats.covariance(0.01)
    prec = precision_from_covariance(cov)
    eye = torch.eye(channels, dtype=torch.float64).expand_as(cov)
    torch.testing.assert_close(torch.bmm(cov, prec), eye, atol=1e-6, rtol=0)


def test_numerically_indefinite_matrix_gets_jitter_instead_of_failing():
    cov = torch.zeros(2, 3, 3, dtype=torch.float64)
    cov[0] = torch.eye(3)
    prec = precision_from_covariance(cov)
    assert torch.isfinite(prec).all()
