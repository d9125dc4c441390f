"""Batched Mahalanobis distance with one symmetric precision matrix per patch position.

``d^2 = (x - mu)^T S (x - mu)`` for every patch and image. At batch 1 (live inspection, 224 px,
100 channels) this is 784 matrix-vector products of 100 x 100: all the precision matrices are
read once per image and there is almost no arithmetic, so the cost is the bytes read and
the per-product overhead. Measured per image after the backbone has run (bench_engine.py):

* ``torch.bmm`` on the full matrices: ~8 ms, 45 % of the backbone (a fixed cost per small
  product dominates);
* one compiled loop (numba, both cores) over the full matrices: 2.5-3.5 ms;
* the same loop over the **packed upper triangles** (this module): 2.0-2.4 ms, and half the
  memory (15.7 instead of 31 MB).

So precision matrices are stored packed: for each patch the rows of the upper triangle
``S[i, i:]`` concatenated, ``C (C + 1) / 2`` values (:func:`pack_symmetric`). Without numba,
or for inputs other than float32, the matrices are unpacked and ``torch.bmm`` is used (in
the widest of the inputs' types); both paths agree with a float64 reference to float32
rounding (tests/core/test_mahalanobis.py).

numba's ``workqueue`` threading layer is used unless the user chose another one: it is
fork-safe and always available, but must not be entered from two threads at once, so calls
are serialised with a lock (the engine scores from one thread anyway).

This module does not import PyTorch when imported: :func:`squared_distances` (numpy in and
out) is what inspection without PyTorch (:mod:`core.lean_inspection`) scores with, and the
torch functions import it when called.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_kernel = None  # compiled lazily: importing numba costs ~0.3 s, compiling ~3 s (then cached)
_kernel_failed = False


def packed_size(channels: int) -> int:
    return channels * (channels + 1) // 2


@functools.lru_cache(maxsize=8)
def _upper_index(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return tuple(torch.triu_indices(channels, channels))  # row-major: row i holds S[i, i:]


@functools.lru_cache(maxsize=8)
def _unpack_index(channels: int) -> torch.Tensor:
    """For every (i, j) of a C x C matrix, the packed position of (min(i,j), max(i,j))."""
    import torch

    pos = torch.empty(channels, channels, dtype=torch.long)
    rows, cols = _upper_index(channels)
    k = torch.arange(rows.numel())
    pos[rows, cols] = k
    pos[cols, rows] = k
    return pos.flatten()


def pack_symmetric(full: torch.Tensor) -> torch.Tensor:
    """(..., C, C) symmetric -> (..., C (C + 1) / 2): rows of the upper triangle."""
    rows, cols = _upper_index(full.shape[-1])
    return full[..., rows, cols].contiguous()


def unpack_symmetric(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., C (C + 1) / 2) -> (..., C, C), the inverse of :func:`pack_symmetric`."""
    if packed.shape[-1] != packed_size(channels):
        raise ValueError(f"{packed.shape[-1]} packed values do not make a {channels}x{channels} matrix")
    flat = packed.reshape(-1, packed.shape[-1]).index_select(1, _unpack_index(channels))
    return flat.view(*packed.shape[:-1], channels, channels)


def trace_of_product(packed: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """trace(S @ M) per patch, in float64, for symmetric S packed (P, T) and M full (P, C, C)."""
    import torch

    rows, cols = _upper_index(full.shape[-1])
    weight = torch.where(rows == cols, 1.0, 2.0).to(torch.float64)  # off-diagonal terms twice
    return (packed.to(torch.float64) * full[..., rows, cols].to(torch.float64) * weight).sum(-1)


def _compile():
    """The numba kernel, or None when numba is missing or fails (torch.bmm is used then)."""
    global _kernel, _kernel_failed
    if _kernel is not None or _kernel_failed:
        return _kernel
    try:
        import numba

        if "NUMBA_THREADING_LAYER" not in os.environ:
            numba.config.THREADING_LAYER = "workqueue"
        from ._mahalanobis_kernel import squared_distances as jit

        jit(np.zeros((1, 1, 2), np.float32), np.zeros((1, 2), np.float32),
            np.ones((1, 3), np.float32), np.zeros((1, 1), np.float32))
        _kernel = jit
    except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
        _kernel_failed = True
        log.warning("compiled Mahalanobis kernel unavailable (%s); using torch.bmm", exc)
    return _kernel


def warm_up() -> None:
    """Compile the kernel (or load it from numba's cache) now rather than at the first score."""
    with _lock:
        _compile()


def _squared_bmm(x: torch.Tensor, mean: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    import torch

    dtype = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), packed.dtype)
    diff = x.to(dtype) - mean.to(dtype)[:, None, :]
    return (torch.bmm(diff, unpack_symmetric(packed.to(dtype), x.shape[-1])) * diff).sum(-1)


def kernel_threads() -> int:
    """Threads for the compiled loop: ``OKNG_NUM_THREADS``, else PyTorch's setting when PyTorch
    is loaded, else the CPUs this process may use; never more than numba's pool."""
    import numba

    from ..graph_runtime import num_threads

    return max(1, min(num_threads(), numba.config.NUMBA_NUM_THREADS))


def squared_distances(x: np.ndarray, mean: np.ndarray, packed: np.ndarray) -> np.ndarray | None:
    """x (P, B, C), mean (P, C), packed precision (P, C (C + 1) / 2), float32 numpy arrays ->
    (P, B) float32 squared distances from the compiled loop; None when it is unavailable
    (the caller falls back). No torch involved."""
    with _lock:
        kernel = _compile()
        if kernel is None:
            return None
        import numba  # loaded by _compile

        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (x, mean, packed)]
        out = np.empty(x.shape[:2], np.float32)
        numba.set_num_threads(kernel_threads())
        kernel(*arrays, out)
    return out


def padim_distances(emb: np.ndarray, mean: np.ndarray, packed: np.ndarray,
                    weights: np.ndarray | None = None) -> np.ndarray | None:
    """PaDiM's distances with the compiled loop, numpy in and out: (B, C, h, w) float32
    embeddings, (P, C) means, (P, C (C + 1) / 2) packed precisions, optional (C,) channel
    weights -> (B, h, w) float32; None when the loop is unavailable.

    :meth:`core.models.padim.PadimModel.score` and inspection without PyTorch both score
    here. No torch operation on the way: each would wake PyTorch's OpenMP threads, which then
    spin on the cores the embedding runtime and the compiled loop need (measured in live
    inspection: a 78 k-value float16 copy took 2-4 ms per frame that way).
    """
    b, c, h, w = emb.shape
    x = np.ascontiguousarray(emb.reshape(b, c, h * w).transpose(2, 0, 1), dtype=np.float32)  # (P, B, C)
    if weights is not None:
        x, mean = x * weights, mean * weights
    d2 = squared_distances(x, mean, packed)
    if d2 is None:
        return None
    np.maximum(d2, 0.0, out=d2)
    return np.ascontiguousarray(np.sqrt(d2, out=d2).T).reshape(b, h, w)  # contiguous, as torch's was


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (P, B, C), mean (P, C), packed precision (P, C (C + 1) / 2) -> distances (P, B)."""
    import torch

    if packed.shape[-1] != packed_size(x.shape[-1]):
        raise ValueError(f"packed precision of width {packed.shape[-1]} does not fit {x.shape[-1]} channels")
    plain = all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad
                for t in (x, mean, packed))
    d2 = None
    if plain:
        out = squared_distances(x.numpy(), mean.numpy(), packed.numpy())
        d2 = None if out is None else torch.from_numpy(out)
    if d2 is None:
        d2 = _squared_bmm(x, mean, packed)
    return d2.clamp_min_(0.0).sqrt_()
