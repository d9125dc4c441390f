"""The batched Mahalanobis distance: compiled kernel and torch path agree with float64 numpy."""
import logging

import numpy as np
import pytest
import torch

from core.models import mahalanobis as M


def reference(x: np.ndarray, mean: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """x (P, B, C) -> (P, B), one patch and one image at a time, in float64."""
    x, mean, prec = (a.astype(np.float64) for a in (x, mean, prec))
    out = np.zeros(x.shape[:2])
    for p in range(x.shape[0]):
        for b in range(x.shape[1]):
            d = x[p, b] - mean[p]
            out[p, b] = np.sqrt(max(d @ prec[p] @ d, 0.0))
    return out


def problem(n_patches: int, batch: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_patches, channels, channels))
    prec = (a @ a.transpose(0, 2, 1) / channels + np.eye(channels)).astype(np.float32)
    mean = rng.standard_normal((n_patches, channels)).astype(np.float32)
    x = (mean[:, None, :] + 2 * rng.standard_normal((n_patches, batch, channels))).astype(np.float32)
    return x, mean, prec


def packed(prec: np.ndarray) -> torch.Tensor:
    return M.pack_symmetric(torch.from_numpy(prec))


def test_packing_keeps_the_upper_triangle_row_by_row_and_unpacks_exactly():
    full = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    assert M.pack_symmetric(full).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    _, _, prec = problem(4, 1, 9)
    assert torch.equal(M.unpack_symmetric(packed(prec), 9), torch.from_numpy(prec))
    with pytest.raises(ValueError, match="do not make a 8x8"):
        M.unpack_symmetric(packed(prec), 8)


def test_trace_of_product_equals_the_full_matrix_trace():
    _, _, a = problem(5, 1, 6, seed=1)
    _, _, b = problem(5, 1, 6, seed=2)
    want = np.einsum("pij,pji->p", a.astype(np.float64), b.astype(np.float64))
    got = M.trace_of_product(packed(a), torch.from_numpy(b).double())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 8, 32])
@pytest.mark.parametrize("channels", [1, 7, 100, 176, 300])
def test_distances_match_a_float64_reference(batch, channels):
    x, mean, prec = problem(13, batch, channels)
    got = M.mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), packed(prec))
    assert got.shape == (13, batch) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference(x, mean, prec), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
def test_float32_scoring_runs_the_compiled_kernel_not_the_torch_fallback(monkeypatch, batch):
    """Guards the speed-up: if numba stopped compiling, scoring would silently fall back."""
    import numba  # noqa: F401  (required: a broken numba must fail here, not skip)

    def no_fallback(*args):
        raise AssertionError("torch.bmm fallback used")

    monkeypatch.setattr(M, "_squared_bmm", no_fallback)
    x, mean, prec = problem(5, batch, 12)
    got = M.mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), packed(prec))
    np.testing.assert_allclose(got.numpy(), reference(x, mean, prec), rtol=1e-4, atol=1e-5)


def test_an_ill_conditioned_precision_keeps_float32_accuracy():
    """Realistic PaDiM statistics: strongly correlated channels, covariance + 0.01 I, so the
    precision's eigenvalues span four orders of magnitude (float32 limits the accuracy)."""
    rng = np.random.default_rng(3)
    n_patches, channels = 6, 100
    factors = rng.standard_normal((n_patches, channels, 10))
    cov = factors @ factors.transpose(0, 2, 1) + 0.01 * np.eye(channels)
    prec = np.linalg.inv(cov).astype(np.float32)
    prec = (prec + prec.transpose(0, 2, 1)) / 2
    mean = rng.standard_normal((n_patches, channels)).astype(np.float32)
    x = (mean[:, None] + rng.standard_normal((n_patches, 4, channels))).astype(np.float32)
    got = M.mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), packed(prec))
    np.testing.assert_allclose(got.numpy(), reference(x, mean, prec), rtol=1e-2)


def test_a_nan_feature_gives_a_nan_distance_not_a_plausible_score():
    x, mean, prec = problem(3, 2, 6)
    x[1, 0, 2] = np.nan
    got = M.mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), packed(prec))
    assert torch.isnan(got[1, 0]) and not torch.isnan(got[[0, 2]]).any() and not torch.isnan(got[1, 1])


def test_mixed_precision_inputs_are_scored_in_the_widest_type():
    x, mean, prec = problem(4, 2, 5)
    got = M.mahalanobis(torch.from_numpy(x).double(), torch.from_numpy(mean), packed(prec))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference(x, mean, prec), rtol=1e-5)


def test_strided_views_give_the_same_distances_as_contiguous_copies():
    """Views of bigger tensors (a component of a stack, a transposed batch) are accepted."""
    x, mean, prec = problem(9, 2, 5)
    stacked_prec = torch.stack([packed(prec), packed(2 * prec)], dim=1)  # (P, 2, T)
    stacked_mean = torch.from_numpy(np.stack([mean, -mean], axis=1))
    xt = torch.from_numpy(x.transpose(1, 0, 2).copy()).transpose(0, 1)  # (P, B, C), not contiguous
    got = M.mahalanobis(xt, stacked_mean[:, 1], stacked_prec[:, 1])
    np.testing.assert_allclose(got.numpy(), reference(x, -mean, 2 * prec), rtol=1e-4, atol=1e-5)


def test_float64_inputs_take_the_torch_path_and_keep_their_precision():
    x, mean, prec = (a.astype(np.float64) for a in problem(4, 1, 6))
    got = M.mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), packed(prec))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference(x, mean, prec), rtol=1e-10)


def test_without_the_compiled_kernel_the_torch_path_gives_the_same_result(monkeypatch, caplog):
    x, mean, prec = problem(6, 1, 10)
    args = (torch.from_numpy(x), torch.from_numpy(mean), packed(prec))
    compiled = M.mahalanobis(*args)
    monkeypatch.setattr(M, "_kernel", None)
    monkeypatch.setattr(M, "_kernel_failed", False)
    monkeypatch.setitem(__import__("sys").modules, "numba", None)  # import numba -> ImportError
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        fallback = M.mahalanobis(*args)
    assert "using torch.bmm" in caplog.text
    np.testing.assert_allclose(fallback.numpy(), compiled.numpy(), rtol=1e-5)


def test_a_point_on_the_mean_has_distance_zero_not_nan():
    x, mean, prec = problem(5, 1, 4)
    x[:, 0] = mean
    got = M.mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), packed(prec))
    assert torch.all(got == 0)


def test_a_precision_of_the_wrong_width_is_refused_by_name():
    x, mean, prec = problem(2, 1, 4)
    with pytest.raises(ValueError, match="does not fit 5 channels"):
        M.mahalanobis(torch.zeros(2, 1, 5), torch.zeros(2, 5), packed(prec))
