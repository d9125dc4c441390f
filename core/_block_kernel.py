"""The compiled loops behind :func:`core.feedback_memory.shortlist_block_distances` and the
memory's best-match search (imports numba)."""
from __future__ import annotations

import math

import numba
import numpy as np


def _jit(fn):
    try:
        return numba.njit(fastmath={"reassoc", "contract"}, cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location
        return numba.njit(fastmath={"reassoc", "contract"}, nogil=True)(fn)


@_jit
def _cell_sum(q, m, i, j, k, lo, hi):  # pragma: no cover - runs compiled
    """Sum of squared differences of query block i and memory block j in cell k, channels
    lo..hi-1 (one stage): the inner loop of both searches, so both sum in the same order.
    Over slices with an index from 0: an index that might be negative gets a wraparound
    check that kept the loop from being vectorised (3x slower, measured)."""
    qs = q[i, k, lo:hi]
    ms = m[j, k, lo:hi]
    a = np.float32(0.0)
    for c in range(hi - lo):
        d = qs[c] - ms[c]
        a += d * d
    return a


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
                    acc[g] += _cell_sum(q, m, i, j, k, bounds[g], bounds[g + 1])
            for g in range(n_g):
                out[i, s, g] = math.sqrt(acc[g] / cells)


@_jit
def _common_cells(qv, mv, i, j):  # pragma: no cover - runs compiled
    cells = 0
    for k in range(9):
        if k == 4 or (qv[i, k] and mv[j, k]):
            cells += 1
    return cells


@_jit
def _sums_within(q, qv, m, mv, i, j, bounds, lim, acc):  # pragma: no cover - runs compiled
    """acc[g] = the block's sum of squared differences per group, cell after cell; False as
    soon as one group's partial sum passes lim[g] (the sums only grow)."""
    n_g = bounds.shape[0] - 1
    for g in range(n_g):
        acc[g] = 0.0
    for k in range(9):
        if k != 4 and not (qv[i, k] and mv[j, k]):
            continue
        over = False
        for g in range(n_g):
            acc[g] += _cell_sum(q, m, i, j, k, bounds[g], bounds[g + 1])
            over |= acc[g] > lim[g]
        if over:
            return False
    return True


@_jit
def _ratio_key(acc, cells, r, j, tol):  # pragma: no cover - runs compiled
    """max over groups of d_g / r[j, g]; where r is 0: 0 within tol, else inf."""
    key = np.float32(0.0)
    for g in range(acc.shape[0]):
        dg = np.float32(math.sqrt(acc[g] / cells))
        if r[j, g] > 0:
            kg = dg / r[j, g]
        elif dg <= tol:
            kg = np.float32(0.0)
        else:
            kg = np.float32(np.inf)
        key = max(key, kg)
    return key


def _best_by_ratio(q, qv, m, mv, idx, live, bounds, r, tol, cutoff, best, out_d):  # pragma: no cover
    """For each query block i, the shortlisted block ``idx[i, s]`` (``live[i, s]``) with the
    smallest key = max over groups of d_g / r[j, g] (r == 0: 0 when d_g <= tol[i], else no
    match), among keys <= ``cutoff`` only -> best[i] = s (-1: none), out_d[i] its (G,) block
    distances (d_g as :func:`_shortlist_distances` computes them, same order of sums).

    Exact, and cheap where the shortlist is mostly far: a block's sum over cells only grows,
    so a block is dropped as soon as one group's partial sum passes what the best key so far
    (or the cutoff) allows. Scoring needs nothing above the cutoff: the gate factor is 1
    there and growth stops below it."""
    n_q, n_s = idx.shape
    n_g = bounds.shape[0] - 1
    acc = np.empty(n_g, np.float32)
    lim = np.empty(n_g, np.float64)
    for i in range(n_q):
        best[i] = -1
        best_key = np.float32(cutoff)
        out_d[i, :] = np.inf
        for s in range(n_s):
            j = idx[i, s]
            if not live[i, s]:
                continue
            cells = _common_cells(qv, mv, i, j)
            for g in range(n_g):
                bound = np.float64(best_key) * np.float64(r[j, g]) if r[j, g] > 0 else np.float64(tol[i])
                lim[g] = bound * bound * cells * 1.0001 + 1e-30  # slack: the final test is exact
            if not _sums_within(q, qv, m, mv, i, j, bounds, lim, acc):
                continue
            key = _ratio_key(acc, cells, r, j, tol[i])
            if key < best_key or (best[i] < 0 and key <= best_key):
                best_key, best[i] = key, s
                for g in range(n_g):
                    out_d[i, g] = np.float32(math.sqrt(acc[g] / cells))


@_jit
def _insert_sorted(val, idx, i, p, x, j):  # pragma: no cover - runs compiled
    """Put value x (column j) into row i's ascending run, starting at slot p and moving
    larger values one slot up."""
    while p > 0 and x < val[i, p - 1]:
        val[i, p] = val[i, p - 1]
        idx[i, p] = idx[i, p - 1]
        p -= 1
    val[i, p] = x
    idx[i, p] = j


def _smallest_k(d, k, idx, val):  # pragma: no cover - runs compiled
    """Per row of d (Q, M): the k smallest values and their columns, ascending (a NaN as
    +inf; ties in column order) -> idx, val (Q, k); needs 0 < k <= M. An insertion into a
    sorted run of k: O(M) per row when most values are larger than the k-th, where a general
    top-k sorts or partitions the whole row."""
    n_q, n_m = d.shape
    for i in range(n_q):
        for j in range(k):  # the first k, sorted by insertion (a NaN as +inf)
            x = d[i, j]
            _insert_sorted(val, idx, i, j, np.inf if x != x else x, j)
        # the rest: one comparison each against the k-th so far (a NaN compares false)
        kth = val[i, k - 1]
        row = d[i, k:]  # indexed from 0: no wraparound check in the hot loop
        for jj in range(n_m - k):
            x = row[jj]
            if x < kth:
                _insert_sorted(val, idx, i, k - 1, x, jj + k)
                kth = val[i, k - 1]


best_by_ratio = _jit(_best_by_ratio)

smallest_k = _jit(_smallest_k)

shortlist_distances = _jit(_shortlist_distances)
