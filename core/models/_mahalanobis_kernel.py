"""The compiled loop behind :func:`core.models.mahalanobis.mahalanobis` (imports numba)."""
from __future__ import annotations

import numba
import numpy as np


def _squared_distances(x, mean, packed, out):  # pragma: no cover - runs compiled
    """x (P, B, C), mean (P, C), packed (P, C(C+1)/2) upper-triangle rows, all float32
    and C-contiguous -> out (P, B) squared distances.

    ``d^T S d = sum_i d_i (S_ii d_i + 2 sum_{j>i} S_ij d_j)``: each stored element is read
    once and used for every image of the batch while its row is in L1. Rows are taken as
    slices starting at 0, which lets LLVM vectorise the dot products (index arithmetic in
    the loop did not).
    """
    n_patches, batch, channels = x.shape
    width = packed.shape[1]
    flat = packed.ravel()
    for p in numba.prange(n_patches):
        diff = np.empty((batch, channels), np.float32)
        for b in range(batch):
            for i in range(channels):
                diff[b, i] = x[p, b, i] - mean[p, i]
            out[p, b] = 0.0
        start = p * width
        for i in range(channels):
            n = channels - i
            row = flat[start : start + n]
            for b in range(batch):
                d = diff[b, i:]
                acc = np.float32(0.0)
                for k in range(1, n):
                    acc += row[k] * d[k]
                out[p, b] += d[0] * (2.0 * acc + row[0] * d[0])
            start += n


#: reassociation lets LLVM vectorise the dot products; unlike ``fastmath=True`` it keeps
#: IEEE NaN/Inf semantics, so a NaN feature still yields a NaN distance
_FASTMATH = {"reassoc", "contract"}

try:
    squared_distances = numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)(_squared_distances)
except RuntimeError:  # no writable cache location (read-only install and no home directory)
    squared_distances = numba.njit(parallel=True, fastmath=_FASTMATH)(_squared_distances)
