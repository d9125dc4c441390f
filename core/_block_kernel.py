"""The compiled loop behind :func:`core.feedback_memory.shortlist_block_distances` (imports numba)."""
from __future__ import annotations

import math

import numba
import numpy as np


def _shortlist_distances(q, qv, m, mv, idx, bounds, out):  # pragma: no cover - runs compiled
    """q (Q, 9, C) query blocks, qv (Q, 9) valid cells, m (M, 9, C) / mv (M, 9) memory
    blocks, idx (Q, S) shortlisted rows of m, bounds (G + 1,) channel group edges -> out
    (Q, S, G): per group, the RMS over commonly valid cells (the centre always counts) of
    the Euclidean distance. The shortlisted blocks are read in place: nothing of size
    Q x S x 9 x C is built, which is what made the tensor version slow."""
    n_q, n_s = idx.shape
    n_g = bounds.shape[0] - 1
    acc = np.empty(n_g, np.float32)
    for i in range(n_q):
        for s in range(n_s):
            j = idx[i, s]
            for g in range(n_g):
                acc[g] = 0.0
            cells = 0
            for k in range(9):
                if k != 4 and not (qv[i, k] and mv[j, k]):
                    continue
                cells += 1
                for g in range(n_g):
                    a = np.float32(0.0)
                    for c in range(bounds[g], bounds[g + 1]):
                        d = q[i, k, c] - m[j, k, c]
                        a += d * d
                    acc[g] += a
            for g in range(n_g):
                out[i, s, g] = math.sqrt(acc[g] / cells)


try:
    shortlist_distances = numba.njit(fastmath={"reassoc", "contract"}, cache=True, nogil=True)(_shortlist_distances)
except RuntimeError:  # no writable cache location
    shortlist_distances = numba.njit(fastmath={"reassoc", "contract"}, nogil=True)(_shortlist_distances)
