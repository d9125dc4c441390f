"""The compiled loops of the feedback memory (core.feedback_memory): block distances on a
shortlist, the k-smallest selection, scoring's search (selection and best match in one
call) and the growth and outlines of matched prints (imports numba)."""
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


def _gather_rows(emb, img, idx, step, feats, valid):  # pragma: no cover - runs compiled
    """Blocks of the looked-up patches, read in place from the channels-first embeddings
    emb (B, C, h, w): patch k (image img[k], flat index idx[k]) -> feats[k] (9, C), the 3x3
    cells ``step`` patches apart (zero off the grid), valid[k] (9,) on the grid. The numpy
    version transposed whole images to channels last and indexed them: twice as long."""
    c, h, w = emb.shape[1], emb.shape[2], emb.shape[3]
    for k in range(idx.shape[0]):
        i, y, x = img[k], idx[k] // w, idx[k] % w
        for cell in range(9):
            yy, xx = y + step * (cell // 3 - 1), x + step * (cell % 3 - 1)
            inside = 0 <= yy < h and 0 <= xx < w
            valid[k, cell] = inside
            if inside:
                for ch in range(c):
                    feats[k, cell, ch] = emb[i, ch, yy, xx]
            else:
                feats[k, cell, :] = 0.0


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


@_jit
def _best_row(q, qv, m, mv, i, idx, val, bounds, r, tol, cutoff, out_d, acc, lim):  # pragma: no cover
    """Of query block i's shortlisted blocks ``idx[i, s]`` (those with a finite ``val[i, s]``),
    the one with the smallest key = max over groups of d_g / r[j, g] (r == 0: 0 when
    d_g <= tol[i], else no match), among keys <= ``cutoff`` only -> (s, key) (-1: none),
    out_d[i] its (G,) block distances (d_g as :func:`_shortlist_distances` computes them, same
    order of sums). ``acc``, ``lim``: scratch of G.

    Exact, and cheap where the shortlist is mostly far: a block's sum over cells only grows,
    so a block is dropped as soon as one group's partial sum passes what the best key so far
    (or the cutoff) allows. Scoring needs nothing above the cutoff: the gate factor is 1
    there and growth stops below it."""
    n_g = bounds.shape[0] - 1
    best = -1
    best_key = np.float32(cutoff)
    out_d[i, :] = np.inf
    for s in range(idx.shape[1]):
        if not math.isfinite(val[i, s]):
            continue
        j = idx[i, s]
        cells = _common_cells(qv, mv, i, j)
        for g in range(n_g):
            bound = np.float64(best_key) * np.float64(r[j, g]) if r[j, g] > 0 else np.float64(tol[i])
            lim[g] = bound * bound * cells * 1.0001 + 1e-30  # slack: the final test is exact
        if not _sums_within(q, qv, m, mv, i, j, bounds, lim, acc):
            continue
        key = _ratio_key(acc, cells, r, j, tol[i])
        if key < best_key or (best < 0 and key <= best_key):
            best_key, best = key, s
            for g in range(n_g):
                out_d[i, g] = np.float32(math.sqrt(acc[g] / cells))
    return best, best_key


def _search_rows(cd, k, q, qv, m, mv, bounds, r, tol, cutoff, idx, val, best, key, out_d):  # pragma: no cover
    """The memory search of scoring, for each row of ``cd`` (Q, M), the centre distances of
    query blocks q (Q, 9, C) / qv (Q, 9) to the blocks m (M, 9, C) / mv (M, 9): shortlist the
    k of smallest centre distance (:func:`_smallest_k`; idx, val (Q, k)), then the best of
    them by :func:`_best_row` -> best[i] its row of m (-1: none), key[i] its key (inf: none),
    out_d[i] its (G,) distances. (Compiled with the GIL released.)"""
    n_g = bounds.shape[0] - 1
    acc = np.empty(n_g, np.float32)
    lim = np.empty(n_g, np.float64)
    smallest_k(cd, k, idx, val)
    for i in range(cd.shape[0]):
        s, kb = _best_row(q, qv, m, mv, i, idx, val, bounds, r, tol, cutoff, out_d, acc, lim)
        best[i] = idx[i, s] if s >= 0 else -1
        key[i] = kb if s >= 0 else np.inf


def _gate(key, best, distinct, low, span, use_distinct, factor, is_distinct):  # pragma: no cover
    """The gate of scoring's matches (see FeedbackMemory.match), from :func:`_search_rows`'s
    key (ratio) and best: factor = clamp((ratio - low) / span, 0, 1) in float32 as numpy
    computes it (span = high - low), 1 where ``use_distinct`` and the best block is not of
    the mark itself (``distinct`` (M,)); is_distinct the best block's flag (False: none).
    One pass where the numpy version made a dozen calls on a hundred values. (No sums here:
    a sum compiled with fastmath may round differently from numpy's, and the match's totals
    are compared with numpy's for the defect blocks.) (Runs compiled.)"""
    for i in range(key.shape[0]):
        f = (key[i] - np.float32(low)) / np.float32(span)
        f = min(max(f, np.float32(0.0)), np.float32(1.0))
        is_distinct[i] = best[i] >= 0 and distinct[best[i]]
        if use_distinct and not is_distinct[i]:
            f = np.float32(1.0)
        factor[i] = f


@_jit
def _insert_ranked(val, idx, i, p, x, j):  # pragma: no cover - runs compiled
    """Put value x (column j) into row i's run, ascending by (value, column), starting at
    slot p and moving the pairs after it one slot up: ties go to the lower column whatever
    order the values come in."""
    while p > 0 and (x < val[i, p - 1] or (x == val[i, p - 1] and j < idx[i, p - 1])):
        val[i, p] = val[i, p - 1]
        idx[i, p] = idx[i, p - 1]
        p -= 1
    val[i, p] = x
    idx[i, p] = j


@_jit
def _scan_row(d, i, k, idx, val):  # pragma: no cover - runs compiled
    """Row i of :func:`_smallest_k` by one pass: the first k sorted by insertion (a NaN as
    +inf), then one comparison each against the k-th so far (a NaN compares false)."""
    for j in range(k):
        x = d[i, j]
        _insert_ranked(val, idx, i, j, np.inf if x != x else x, j)
    kth = val[i, k - 1]
    row = d[i, k:]  # indexed from 0: no wraparound check in the hot loop
    for jj in range(d.shape[1] - k):
        x = row[jj]
        if x < kth:
            _insert_ranked(val, idx, i, k - 1, x, jj + k)
            kth = val[i, k - 1]


_CHUNK = 16  # values per chunk of the k-smallest selection


@_jit
def _count_at_most(mins, x):  # pragma: no cover - runs compiled
    n = 0
    for c in range(mins.shape[0]):
        if mins[c] <= x:
            n += 1
    return n


@_jit
def _chunk_bound(mins, k):  # pragma: no cover - runs compiled
    """A value t with at least k of the chunk minima <= t, close above the k-th smallest
    (bisection on the value: counting is a vectorised pass where ranking them in a sorted
    run was not); +inf when fewer than k are finite."""
    lo, hi, finite = np.float32(np.inf), np.float32(-np.inf), 0
    for c in range(mins.shape[0]):
        x = mins[c]
        if x < np.inf:
            finite += 1
            lo, hi = min(lo, x), max(hi, x)
    if finite < k:
        return np.float32(np.inf)
    for _ in range(24):  # hi always has >= k minima at or below it
        if _count_at_most(mins, hi) <= k + 2:
            break
        mid = np.float32(lo + (hi - lo) * np.float32(0.5))
        if not lo < mid < hi:
            break
        if _count_at_most(mins, mid) >= k:
            hi = mid
        else:
            lo = mid
    return hi


@_jit
def _smallest_row(d, i, k, idx, val, mins):  # pragma: no cover - runs compiled
    """Row i of :func:`_smallest_k`; ``mins`` (M // _CHUNK,): scratch.

    Chunk c holds the columns c, c + n, c + 2n, ... (n = M // _CHUNK chunks): their minima
    are then elementwise minima of _CHUNK contiguous slices (vectorised, where a minimum
    within contiguous chunks was a horizontal reduction each). At least k values are <= t
    (:func:`_chunk_bound`), so only values <= t can be among the k smallest, and only
    chunks whose minimum is <= t hold any (about one in eight on a memory's distances).
    Their values go into a run ranked by (value, column): the same result as
    :func:`_scan_row`. (0.35 -> 0.22 ms for the benchmark's 118 rows of 2,004 against
    contiguous chunks ranked in a sorted run.)"""
    n = d.shape[1]
    n_chunks = n // _CHUNK
    if n_chunks < 2 * k:
        _scan_row(d, i, k, idx, val)
        return
    row = d[i]
    mins[:] = np.inf
    for part in range(_CHUNK):
        seg = row[part * n_chunks:(part + 1) * n_chunks]
        for c in range(n_chunks):
            x = seg[c]
            mins[c] = x if x < mins[c] else mins[c]  # a NaN is skipped
    t = _chunk_bound(mins, k)
    if not t < np.inf:  # fewer than k chunks with a finite value: NaN and inf need the plain pass
        _scan_row(d, i, k, idx, val)
        return
    count, kth, kth_at = 0, t, n  # until k are taken: everything <= t
    for c in range(n_chunks):
        if not mins[c] <= t:
            continue
        for part in range(_CHUNK):
            at = c + part * n_chunks
            x = row[at]
            if x < kth or (x == kth and at < kth_at):
                count = _take(val, idx, i, k, count, x, at)
                if count == k:
                    kth, kth_at = val[i, k - 1], idx[i, k - 1]
    for at in range(n_chunks * _CHUNK, n):  # the few columns after the chunks
        x = row[at]
        if x < kth or (x == kth and at < kth_at):
            count = _take(val, idx, i, k, count, x, at)
            if count == k:
                kth, kth_at = val[i, k - 1], idx[i, k - 1]


@_jit
def _take(val, idx, i, k, count, x, at):  # pragma: no cover - runs compiled
    """Value x (column at) into row i's ranked run of ``count`` -> the run's new length
    (at most k: the k-th is dropped)."""
    _insert_ranked(val, idx, i, count if count < k else k - 1, x, at)
    return count + 1 if count < k else count


def _smallest_k(d, k, idx, val):  # pragma: no cover - runs compiled
    """Per row of d (Q, M): the k smallest values and their columns, ascending (a NaN as
    +inf; ties in column order) -> idx, val (Q, k); needs 0 < k <= M. Insertion into a
    ranked run of k, of the values that can be among them (:func:`_smallest_row`): a
    general top-k sorts or partitions the whole row."""
    mins = np.empty(d.shape[1] // _CHUNK, d.dtype)  # t exactly as in d
    for i in range(d.shape[0]):
        _smallest_row(d, i, k, idx, val, mins)


@_jit
def _grow_from_seeds(idx, seed, near, h, w, hit):  # pragma: no cover - runs compiled
    """hit[k] = True where looked-up patch k is near and 8-connected through near patches
    to a seed (a seed is near): a flood fill from every seed."""
    n = idx.shape[0]
    at = np.full(h * w, -1, np.int64)  # the looked-up near patch at each cell
    for k in range(n):
        if near[k]:
            at[idx[k]] = k
    stack = np.empty(n, np.int64)
    for k0 in range(n):
        if not seed[k0] or hit[k0]:
            continue
        hit[k0] = True
        stack[0] = k0
        top = 1
        while top > 0:
            top -= 1
            y, x = idx[stack[top]] // w, idx[stack[top]] % w
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    j = at[yy * w + xx]
                    if j >= 0 and not hit[j]:
                        hit[j] = True
                        stack[top] = j
                        top += 1


@_jit
def _outline_mask(idx, seed, best, order, first, counts, print_of, pos, h, w):  # pragma: no cover
    """(h, w) bool: each seed's matched print (the accepted blocks of the matched block's
    print) moved so the matched block sits on the seed."""
    mask = np.zeros((h, w), np.bool_)
    for k in range(idx.shape[0]):
        if not seed[k]:
            continue
        b = best[k]
        p = print_of[b]
        sy, sx = idx[k] // w - pos[b, 0], idx[k] % w - pos[b, 1]
        for t in range(first[p], first[p] + counts[p]):
            ty, tx = pos[order[t], 0] + sy, pos[order[t], 1] + sx
            if 0 <= ty < h and 0 <= tx < w:
                mask[ty, tx] = True
    return mask


def _print_hits(idx, seed, near, within, best, order, first, counts, print_of, pos, h, w, grow, outline,
                hit):  # pragma: no cover - runs compiled
    """Growth and outlines of one image's confident matches (see FeedbackMemory._grown):
    looked-up patches idx (K,) (flat, on an h x w grid) with their seed / near / within
    flags and best accepted block -> hit[k] True where patch k joins a matched print:
    ``grow``: near and 8-connected through near patches to a seed; ``outline``: within and
    inside an outline (:func:`_outline_mask` widened by one patch). ``order``, ``first``,
    ``counts``, ``print_of``, ``pos``: the accepted blocks grouped by print. One pass where
    the numpy version made some forty calls of a few microseconds each."""
    hit[:] = False
    if grow:
        _grow_from_seeds(idx, seed, near, h, w, hit)
    if not outline:
        return
    mask = _outline_mask(idx, seed, best, order, first, counts, print_of, pos, h, w)
    for k in range(idx.shape[0]):
        if hit[k] or not within[k]:
            continue
        y, x = idx[k] // w, idx[k] % w
        for yy in range(max(y - 1, 0), min(y + 2, h)):  # the outline widened by one patch
            for xx in range(max(x - 1, 0), min(x + 2, w)):
                hit[k] |= mask[yy, xx]


search_rows = _jit(_search_rows)

print_hits = _jit(_print_hits)

smallest_k = _jit(_smallest_k)

shortlist_distances = _jit(_shortlist_distances)

gather_rows = _jit(_gather_rows)

gate = _jit(_gate)
