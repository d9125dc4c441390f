"""Position-free memory of accepted appearances: a false alarm teaches "this look is normal"
wherever on the part it shows up next (issue 11).

The model's own update after a click (PaDiM: the Gaussians *at the clicked positions*) does
not help when a benign mark (ink stamp, label, fixture shadow) lands at a different place on
every part. This memory keeps the clicked patches themselves and lowers the distance of any
patch, at any position, that looks like one of them:

* **Blocks, not patches.** Each accepted patch is stored with its 3x3 neighbourhood (the
  neighbours inside the clicked region). A query patch matches an accepted one when the whole
  block matches at that offset: the rigid arrangement of the mark, not one patch's look, which
  is what keeps a crack from matching a stamp's stroke. The distance is the RMS over the
  block's valid cells of the Euclidean distance in the raw embedding (raw features separated
  two prints of one mark better than Mahalanobis-whitened ones: feedback notes).
* **Several stages agreeing.** Distances are kept per backbone stage (``channel_groups``);
  a match must hold in every stage (the ratio below is the largest over stages).
* **A learnt scale.** Each accepted block ``a`` gets its own radius ``r_a`` per stage: its
  block distance to the nearest block of *another* click (leave-one-click-out), i.e. how far
  apart two prints of the same thing really are. A query block's best match is the accepted
  block with the smallest ``ratio = max_stage D / r_a``; the model's patch distance is
  multiplied by ``clamp((ratio - low) / (high - low), 0, 1)`` (defaults 1.0 and 1.3): as close
  as prints seen so far are to each other -> 0, farther than 1.3 times that -> unchanged.
  The result stays on the model's own scale (a factor on its distance, never an added one),
  so thresholds keep their meaning and a clicked patch itself goes to 0. A single click has
  no spread yet: then only exact copies of its patches are lowered (radius 0); from the
  second click on, every block has a radius.
* **A print is matched as a whole.** The ramp alone leaves the margin of a print hot: its
  blocks hold a partial view of the mark that shifts with every print (ratios 1.1-1.3 where
  the print's core matches at <= 1). So matches grow like hysteresis thresholds: a hot patch
  whose ratio is within ``grow`` (default 1.2) and that is 8-connected, through other such
  hot patches, to a confident match (ratio <= ``low``) is lowered fully too. A defect's
  blocks match the memory at 1.14-1.5 (median 1.28) and rarely touch a confident match,
  so it keeps its heat (benchmarks/bench_feedback.py; README, "What feedback buys").
  ``grow=None`` turns this off (model files written before it existed load that way).
* **Where the print should be.** A confident match also says where the rest of the print
  lies: the matched block's click covered the whole mark, so its accepted patches, moved by
  the offset between the match and where that block was clicked (and widened by one patch for
  rotation and scale), outline the new print. Inside that outline a hot patch is lowered
  fully up to ``footprint`` (default 1.3, the ramp's top): the margin of a framed mark that
  shifts with every print matches at 1.2-1.32, past ``grow``. A defect is only affected where
  it lies under a print's outline. ``footprint=None`` turns this off.
* **Only the mark's own blocks start a match** (``distinct``): a click also covers ordinary
  surroundings of the mark, and defect patches matched those at ratios 1-1.3 far from any
  mark (16-58 lowered patches per flipped defect). A block counts as the mark when prints of
  it are nearer to each other than to anything ordinary (:meth:`FeedbackMemory.distinct_blocks`);
  the others lower a patch only through growth or an outline from a mark block.
  Model files written before outlines or mark blocks existed load without them.
* **Confirmed defects are negatives.** Blocks of a region marked as a real defect are kept too;
  a query patch whose nearest defect block is nearer than its best accepted block is never
  lowered.
* **Radius in patches** (``radius``, per recipe): accept a match only within that many
  patches of where the accepted patch was clicked; ``None`` (default): anywhere.

Cost: only patches whose model distance reaches ``floor`` x the pixel threshold are looked up
(lower ones cannot make a part NG: a map pixel is a weighted mean of patch distances), at most
``candidates`` per image, each against a ``shortlist`` of accepted blocks picked by
centre-patch distance. Measured with a 2,000-patch memory in benchmarks/bench_feedback.py
``--timing`` (README, "What feedback buys").
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from .models.patchcore import one_torch_thread, torch_threads

#: cells of a 3x3 block, row-major; index 4 is the centre
_OFFSETS = torch.tensor([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.int64)
_OFFSETS_NP = _OFFSETS.numpy()
_CENTRE = 4


@dataclass
class MemoryMatch:
    """Per queried patch: the gate factor, best accepted block and its ratio (for tests/GUI)."""

    factor: torch.Tensor  # (Q,) in [0, 1]
    ratio: torch.Tensor  # (Q,) max over stages of D / r of the best accepted block (inf: none)
    accepted_distance: torch.Tensor  # (Q,) block distance to that block
    defect_distance: torch.Tensor  # (Q,) block distance to the nearest defect block (inf: none)
    #: (Q,) index of the best accepted block (-1: none); None where not computed
    best: torch.Tensor | None = None
    #: (Q,) bool: that block is of the mark itself (see FeedbackMemory.distinct); None: all are
    distinct: torch.Tensor | None = None

    @property
    def blocked(self) -> torch.Tensor:
        """(Q,) bool: a confirmed defect's block is at least as near: never lowered."""
        return self.defect_distance <= self.accepted_distance


def block_distances(q: torch.Tensor, q_valid: torch.Tensor, m: torch.Tensor, m_valid: torch.Tensor,
                    groups: list[slice | torch.Tensor]) -> torch.Tensor:
    """RMS distance over commonly valid cells, per channel group:
    q (Q, 9, C), m (Q, S, 9, C), groups: channel indices of each of G groups -> (Q, S, G).

    The centre cell always counts (a pair with no other common cell still compares it)."""
    diff = q[:, None] - m  # (Q, S, 9, C)
    diff = diff * diff
    sq = torch.stack([diff[..., g].sum(-1) for g in groups], -1)  # (Q, S, 9, G)
    both = (q_valid[:, None] & m_valid).to(sq.dtype)
    both[..., _CENTRE] = 1.0
    return (sq * both[..., None]).sum(-2).div(both.sum(-1, keepdim=True)).sqrt()


_kernel = None  # the compiled shortlist loop, built at the first look-up (numba: ~0.3 s import)
_search_kernel = None  # the compiled shortlist + best-match search of scoring (same module)
_smallest_kernel = None  # the compiled k-smallest selection (same module)
_print_kernel = None  # the compiled growth and outlines (same module)
_gather_kernel = None  # the compiled gathering of scoring's query blocks (same module)
_gate_kernel = None  # the compiled gate of scoring's matches (same module)
_kernel_failed = False


_kernel_lock = threading.Lock()

#: scoring's search splits its rows over two cores from this many rows on (fewer: the
#: hand-over costs more than it saves)
PIPELINE_ROWS = 32


def _compiled():
    """The compiled shortlist loop, the others set beside it (None: numba unavailable). Loaded
    once, under a lock: the station warms it up on its engine thread while another may score;
    ``_kernel`` is set last, so whoever sees it sees the others too."""
    global _kernel, _search_kernel, _smallest_kernel, _print_kernel, _gather_kernel, _gate_kernel, _kernel_failed
    if _kernel is not None or _kernel_failed:
        return _kernel
    with _kernel_lock:
        if _kernel is not None or _kernel_failed:
            return _kernel
        try:
            from ._block_kernel import gate, gather_rows, print_hits, search_rows, shortlist_distances, smallest_k

            z, v, i = np.zeros((1, 9, 2), np.float32), np.ones((1, 9), bool), np.zeros((1, 1), np.int64)
            bounds = np.array([0, 2], np.int64)
            shortlist_distances(z, v, z, v, i, bounds, np.empty((1, 1, 1), np.float32))
            search_rows(np.zeros((1, 1), np.float32), 1, z, v, z, v, bounds, np.ones((1, 1), np.float32),
                        np.zeros(1, np.float32), 1.0, np.empty((1, 1), np.int64), np.empty((1, 1), np.float32),
                        np.empty(1, np.int64), np.empty(1, np.float32), np.empty((1, 1), np.float32))
            smallest_k(np.zeros((1, 2), np.float32), 1, np.empty((1, 1), np.int64), np.empty((1, 1), np.float32))
            one, yes = np.zeros(1, np.int64), np.ones(1, bool)
            print_hits(one, yes, yes, yes, one, one, one, np.ones(1, np.int64), one, np.zeros((1, 2), np.int64),
                       1, 1, True, True, np.empty(1, bool))
            gather_rows(np.zeros((1, 2, 1, 1), np.float32), one, one, 1, np.empty((1, 9, 2), np.float32),
                        np.empty((1, 9), bool))
            gate(np.zeros(1, np.float32), one, yes, 1.0, 0.3, True, np.empty(1, np.float32), yes.copy())
            _search_kernel, _smallest_kernel, _print_kernel = search_rows, smallest_k, print_hits
            _gather_kernel, _gate_kernel = gather_rows, gate
            _kernel = shortlist_distances
        except Exception:  # noqa: BLE001 - any failure here only costs speed
            _kernel_failed = True
    return _kernel


_helper: tuple[int, ThreadPoolExecutor] | None = None  # (pid, one worker) for the look-up's second core
_helper_lock = threading.Lock()


def _second_core() -> ThreadPoolExecutor:
    """One worker thread of our own for the search of scoring (compiled, GIL released): made
    at first use, again in a forked child (a fork keeps the executor but not its thread)."""
    global _helper
    pid = os.getpid()
    if _helper is None or _helper[0] != pid:
        with _helper_lock:
            if _helper is None or _helper[0] != pid:
                _helper = (pid, ThreadPoolExecutor(1, thread_name_prefix="okng-memory"))
    return _helper[1]


def warm_up() -> bool:
    """Compile (or load from numba's cache) the memory's kernels now; False where numba is
    unavailable (the tensor fallbacks then run)."""
    return _compiled() is not None


def _smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest values of each row of d (Q, M) and their columns, ascending
    (a compiled selection: a general top-k costs ~6 us per row of 2,000 and scoring has a
    hundred rows). Ties go to the lower column (torch's top-k leaves their order open); a NaN
    counts as +inf (after every finite value, tied with inf by column)."""
    if _compiled() is None or d.dtype != torch.float32 or d.shape[0] == 0 or not 0 < k <= d.shape[1]:
        return d.topk(k, dim=1, largest=False)
    idx, val = np.empty((d.shape[0], k), np.int64), np.empty((d.shape[0], k), np.float32)
    _smallest_kernel(np.ascontiguousarray(d.numpy()), k, idx, val)
    return torch.from_numpy(val), torch.from_numpy(idx)


def _contiguous_bounds(groups: list[slice | torch.Tensor]) -> np.ndarray | None:
    """Edges of contiguous channel groups laid end to end (G + 1,), else None."""
    if not all(isinstance(g, slice) for g in groups):
        return None
    bounds = np.array([groups[0].start] + [g.stop for g in groups], np.int64)
    if any(g.start != b for g, b in zip(groups, bounds[:-1])):
        return None
    return bounds


def shortlist_block_distances(q: torch.Tensor, qv: torch.Tensor, m: torch.Tensor, mv: torch.Tensor,
                              idx: torch.Tensor, groups: list[slice | torch.Tensor]) -> torch.Tensor:
    """:func:`block_distances` of each query block against its shortlisted memory blocks
    ``m[idx]`` (idx (Q, S)) -> (Q, S, G), without gathering them: a compiled loop when the
    channel groups are contiguous (the backbone's stages always are)."""
    kernel = _compiled()
    bounds = _contiguous_bounds(groups)
    if kernel is None or bounds is None or idx.numel() == 0:
        return block_distances(q, qv, m[idx], mv[idx], groups)
    out = np.empty((*idx.shape, len(groups)), np.float32)
    kernel(*(np.ascontiguousarray(t.numpy()) for t in (q, qv, m, mv, idx)), bounds, out)
    return torch.from_numpy(out)


class FeedbackMemory:
    """Accepted (and defect) blocks with their learnt scale; see the module docstring."""

    def __init__(self, grid: tuple[int, int], n_channels: int, radius: int | None = None,
                 low: float = 1.0, high: float = 1.3, candidates: int = 256, shortlist: int = 16,
                 channel_groups: list[int] | None = None, step: int = 1, floor: float = 0.9,
                 grow: float | None = 1.2, footprint: float | None = 1.3, distinct: bool = True) -> None:
        if radius is not None and int(radius) < 0:
            raise ValueError(f"radius must be >= 0 patches or None (anywhere), got {radius}")
        if grow is not None and not float(grow) >= float(low):
            raise ValueError(f"grow must be >= low ({low}) or None (off), got {grow}")
        if footprint is not None and not float(footprint) >= float(low):
            raise ValueError(f"footprint must be >= low ({low}) or None (off), got {footprint}")
        if not 0 <= low < high or int(candidates) < 1 or int(shortlist) < 1 or int(step) < 1 or not floor >= 0:
            raise ValueError("need 0 <= low < high, candidates, shortlist and step >= 1, floor >= 0")
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_channels = int(n_channels)
        self.radius = None if radius is None else int(radius)
        self.step = int(step)
        self.floor = float(floor)
        self.low = float(low)
        self.high = float(high)
        self.grow = None if grow is None else float(grow)
        self.footprint = None if footprint is None else float(footprint)
        if not isinstance(distinct, bool):
            raise ValueError(f"distinct must be True or False, got {distinct!r}")
        self.distinct = distinct
        groups = [0] * int(n_channels) if channel_groups is None else [int(g) for g in channel_groups]
        if len(groups) != int(n_channels):
            raise ValueError(f"channel_groups has {len(groups)} entries for {n_channels} channels")
        self.channel_groups = groups
        ids = sorted(set(groups))
        self._groups: list[slice | torch.Tensor] = []
        for g in ids:
            members = [c for c, x in enumerate(groups) if x == g]
            contiguous = members == list(range(members[0], members[-1] + 1))
            self._groups.append(slice(members[0], members[-1] + 1) if contiguous else torch.tensor(members))
        self.candidates = int(candidates)
        self.shortlist = int(shortlist)
        c = self.n_channels
        self.blocks = torch.zeros(0, 9, c)  # accepted blocks (N, 9, C) float32
        self.valid = torch.zeros(0, 9, dtype=torch.bool)
        self.pos = torch.zeros(0, 2, dtype=torch.int64)  # (row, col) where each was clicked
        self.click = torch.zeros(0, dtype=torch.int64)  # which click it came from
        #: leave-one-click-out distance of each accepted block, per group (-1: no other click)
        self.loo = torch.zeros(0, len(ids))
        #: distance of each accepted block to its nearest ordinary OK block, per group (-1: unknown)
        self.ok_dist = torch.zeros(0, len(ids))
        self._scale: torch.Tensor | None = None
        self._distinct: torch.Tensor | None = None
        #: numpy views for scoring's compiled search (:meth:`_search_arrays`)
        self._arrays: tuple | None = None
        #: (blocks, their contiguous centres, squared norms) for the accepted and defect blocks
        self._centre_cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        #: accepted blocks grouped by print (numpy, for outlines): the order that sorts them by
        #: print, each print's first row in it and size, each block's print, each position
        self._members: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.neg_blocks = torch.zeros(0, 9, c)
        self.neg_valid = torch.zeros(0, 9, dtype=torch.bool)
        self.n_clicks = 0

    # -- state --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def n_defect_blocks(self) -> int:
        return int(self.neg_blocks.shape[0])

    def params(self) -> dict[str, Any]:
        return {"radius": self.radius, "low": self.low, "high": self.high, "candidates": self.candidates,
                "shortlist": self.shortlist, "channel_groups": self.channel_groups, "step": self.step,
                "floor": self.floor, "grow": self.grow, "footprint": self.footprint,
                "distinct": self.distinct}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks, "valid": self.valid, "pos": self.pos, "click": self.click,
                "loo": self.loo, "ok_dist": self.ok_dist, "neg_blocks": self.neg_blocks, "neg_valid": self.neg_valid,
                "n_clicks": torch.tensor([self.n_clicks], dtype=torch.int64)}

    def expected(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype each stored tensor must have (sizes taken from the file itself)."""
        def rows(name: str) -> int:
            t = tensors.get(name)
            return int(t.shape[0]) if t is not None and t.dim() == 3 else -1

        n, k = rows("blocks"), rows("neg_blocks")
        c = self.n_channels
        return {"blocks": ((n, 9, c), torch.float32), "valid": ((n, 9), torch.bool), "pos": ((n, 2), torch.int64),
                "click": ((n,), torch.int64), "loo": ((n, len(self._groups)), torch.float32),
                "ok_dist": ((n, len(self._groups)), torch.float32),
                "neg_blocks": ((k, 9, c), torch.float32), "neg_valid": ((k, 9), torch.bool),
                "n_clicks": ((1,), torch.int64)}

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self.blocks, self.valid, self.pos = t["blocks"].contiguous(), t["valid"].contiguous(), t["pos"].contiguous()
        self.click, self.loo = t["click"].contiguous(), t["loo"].contiguous()
        self.ok_dist = t["ok_dist"].contiguous()
        self._scale = self._distinct = self._members = None
        self.neg_blocks, self.neg_valid = t["neg_blocks"].contiguous(), t["neg_valid"].contiguous()
        self.n_clicks = int(t["n_clicks"].reshape(-1)[0])

    def copy(self) -> FeedbackMemory:
        clone = FeedbackMemory(self.grid, self.n_channels, **self.params())
        clone.load_tensors({k: v.clone() for k, v in self.tensors().items()})
        return clone

    # -- learning -----------------------------------------------------------------------
    def add(self, emb: torch.Tensor, accept: torch.Tensor, region: torch.Tensor | None = None,
            reference: torch.Tensor | None = None) -> int:
        """Accept the patches ``accept`` (h, w) bool of one image's embedding ``emb`` (1, C, h, w)
        as normal anywhere; ``region`` (h, w) bool (default: ``accept``) bounds the block
        neighbours that count as part of the accepted appearance. ``reference`` (N, C, h, w):
        embeddings of ordinary OK parts (the detector's held-out calibration images); each
        new block's distance to its nearest ordinary block decides whether it is a recurring
        appearance (see :attr:`scale`). Returns blocks added."""
        accept = accept.reshape(self.grid).to(torch.bool)
        region = accept if region is None else (region.reshape(self.grid).to(torch.bool) | accept)
        if not bool(accept.any()):
            return 0
        idx = torch.nonzero(accept.reshape(-1)).flatten()
        blocks, valid = _gather_blocks(emb[:1].to(torch.float32), torch.zeros_like(idx), idx, self.step, region)
        h, w = self.grid
        self.blocks = torch.cat([self.blocks, blocks])
        self.valid = torch.cat([self.valid, valid])
        self.pos = torch.cat([self.pos, torch.stack([idx // w, idx % w], 1)])
        self.click = torch.cat([self.click, torch.full((idx.numel(),), self.n_clicks, dtype=torch.int64)])
        ok_dist = torch.full((idx.numel(), len(self._groups)), -1.0)
        if reference is not None and reference.shape[0]:
            d = self._nearest_in(blocks, valid, reference)
            ok_dist = torch.where(torch.isfinite(d), d, ok_dist)
        self.ok_dist = torch.cat([self.ok_dist, ok_dist.to(torch.float32)])
        self.n_clicks += 1
        self._learn_scale(int(idx.numel()))
        return int(idx.numel())

    def add_defect(self, emb: torch.Tensor, region: torch.Tensor) -> int:
        """Remember the blocks of a confirmed defect region (h, w) bool: never accept where
        these are nearer than the accepted blocks."""
        region = region.reshape(self.grid).to(torch.bool)
        idx = torch.nonzero(region.reshape(-1)).flatten()
        blocks, valid = _gather_blocks(emb[:1].to(torch.float32), torch.zeros_like(idx), idx, self.step, region)
        self.neg_blocks = torch.cat([self.neg_blocks, blocks])
        self.neg_valid = torch.cat([self.neg_valid, valid])
        return int(idx.numel())

    def _nearest_in(self, q: torch.Tensor, qv: torch.Tensor, reference: torch.Tensor,
                    chunk: int = 16) -> torch.Tensor:
        """(Q, G) per-group block distance of each query block to its nearest block (any
        position) of the reference embeddings (N, C, h, w): shortlist by centre patch per
        chunk of images, block distances on the shortlist only."""
        n, c, h, w = reference.shape
        best = torch.full((q.shape[0], len(self._groups)), float("inf"))
        qc = q[:, _CENTRE]
        s = self.shortlist
        for lo in range(0, n, chunk):
            ref = reference[lo : lo + chunk].to(torch.float32)
            centres = ref.permute(0, 2, 3, 1).reshape(-1, c)
            cd = torch.addmm((centres * centres).sum(1)[None], qc, centres.T, alpha=-2.0)
            k = min(s, centres.shape[0])
            top = cd.topk(k, dim=1, largest=False).indices  # (Q, k)
            flat = top.reshape(-1)
            m, mv = _gather_blocks(ref, flat // (h * w), flat % (h * w), self.step)
            d = block_distances(q, qv, m.view(q.shape[0], k, 9, c), mv.view(q.shape[0], k, 9), self._groups)
            best = torch.minimum(best, d.min(1).values)
        return best

    def _learn_scale(self, new: int) -> None:
        """Leave-one-click-out radius of each accepted block, per channel group: its distance
        to the nearest block of another click. Only the ``new`` last blocks are measured
        against the others (and the others against them): a click costs O(new x N)."""
        n, g = len(self), len(self._groups)
        old = n - new
        loo = torch.full((n, g), -1.0)
        loo[:old] = self.loo
        if old and new:
            nb, nv = self.blocks[old:], self.valid[old:]
            d, _ = self._nearest(nb, nv, self.blocks[:old], self.valid[:old], None, per_group=True)
            loo[old:] = torch.where(torch.isfinite(d), d, torch.full_like(d, -1.0))
            for lo in range(0, old, 2048):
                hi = min(lo + 2048, old)
                d, _ = self._nearest(self.blocks[lo:hi], self.valid[lo:hi], nb, nv, None, per_group=True)
                cur = loo[lo:hi]
                loo[lo:hi] = torch.where(torch.isfinite(d) & ((cur < 0) | (d < cur)), d, cur)
        self.loo = loo.to(torch.float32)
        self._scale = self._distinct = self._members = None

    @property
    def scale(self) -> torch.Tensor:
        """(N, G) radius of each accepted block (its leave-one-click-out distance). A block
        with no other click yet gets the smallest radius learnt so far (0 while there is only
        one click: then only exact copies of the clicked patches are lowered)."""
        if self._scale is None or self._scale.shape[0] != len(self):
            known = self.loo >= 0
            big = torch.where(known, self.loo, torch.full_like(self.loo, float("inf")))
            fill = big.min(0).values if len(self) else torch.zeros(self.loo.shape[1])
            fill = torch.where(torch.isfinite(fill), fill, torch.zeros_like(fill))
            r = torch.where(known, self.loo, fill.expand_as(self.loo))
            self._scale = torch.where(self._recurring()[:, None], r, torch.zeros_like(r)).contiguous()
        return self._scale

    def _recurring(self) -> torch.Tensor:
        """(N,) bool: the block's click shows a *recurring* appearance. Judged per click on its
        most unusual half of blocks (largest distance to ordinary OK patches, i.e. the mark
        itself, not its margin): recurring when their median of ``max_stage r / ok_dist`` is
        below 1, i.e. prints of it are nearer to each other than to anything ordinary. A
        click on a rare texture (poly crystal) is not: its blocks then lower exact copies
        only. Without reference distances every click counts as recurring."""
        n = len(self)
        out = torch.ones(n, dtype=torch.bool)
        known = (self.ok_dist >= 0).all(-1) & (self.loo >= 0).all(-1)
        for c in torch.unique(self.click).tolist():
            rows = torch.nonzero((self.click == c) & known).flatten()
            if rows.numel() == 0:
                continue
            s = self.ok_dist[rows].amin(-1)
            core = rows[s >= s.median()]
            rel = (self.loo[core] / self.ok_dist[core].clamp_min(1e-12)).amax(-1)
            out[self.click == c] = bool(rel.median() < 1.0)
        return out

    def distinct_blocks(self) -> torch.Tensor:
        """(N,) bool: blocks of the mark itself rather than of its surroundings: prints of it
        are nearer to each other than to anything in the ordinary OK parts (in every stage,
        ``loo < ok_dist``). Only these start a match or lower a patch on their own; the
        others (the ordinary margin the click also covered) lower a patch only as part of a
        print that a distinctive block matched. Blocks without a known distance count, and so
        do those of a click that does not recur (:meth:`_recurring`): their radius is 0, they
        stand for exact copies of themselves only, and an exact copy of a clicked patch is
        the clicked appearance itself (without this, a second click on something that looks
        different made the first click's blocks "not the mark" and undid it)."""
        if self._distinct is None or self._distinct.shape[0] != len(self):
            known = (self.ok_dist >= 0).all(-1) & (self.loo >= 0).all(-1)
            near = (self.loo < self.ok_dist).all(-1)
            self._distinct = ~known | near | ~self._recurring()
        return self._distinct

    def _centres(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre patches of blocks ``m`` (M, C), contiguous, and their squared norms: kept for
        the accepted and the defect blocks (copying the strided centres for every scored image
        cost as much as the product itself)."""
        for cached in self._centre_cache:
            if cached[0] is m:
                return cached[1], cached[2]
        mc = m[:, _CENTRE].contiguous()
        out = (m, mc, (mc * mc).sum(1))
        if m is self.blocks or m is self.neg_blocks:
            self._centre_cache = [c for c in self._centre_cache if c[0] is self.blocks or c[0] is self.neg_blocks]
            self._centre_cache.append(out)
        return mc, out[2]

    def _centre_distances(self, q: torch.Tensor, m: torch.Tensor, allowed: torch.Tensor | None,
                          threads: int = 1) -> torch.Tensor:
        """(Q, M) ``|q_c - m_c|^2 - |q_c|^2`` between the centre patches of query blocks q and
        blocks m (what the shortlist ranks by), inf where not ``allowed``; the product on
        ``threads`` of PyTorch's threads."""
        mc, mc_sq = self._centres(m)
        with torch_threads(threads):
            cd = torch.addmm(mc_sq[None], q[:, _CENTRE], mc.T, alpha=-2.0)
        return cd if allowed is None else cd.masked_fill(~allowed, float("inf"))

    def _nearest(self, q: torch.Tensor, qv: torch.Tensor, m: torch.Tensor, mv: torch.Tensor,
                 allowed: torch.Tensor | None, rank_by: torch.Tensor | None = None,
                 per_group: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Best block of ``m`` for each query block: ((Q, G) distances, (Q,) index; inf/-1 if none).

        Shortlist by centre-patch distance, then the block distance per channel group. The
        best is the one with the smallest ``max_g d_g / rank_by_g`` (``rank_by`` (M, G)), or
        with ``per_group`` each group's own minimum (index: of the first group), else the
        smallest overall distance. (Scoring's search is :meth:`_search`.)"""
        nq, g = q.shape[0], len(self._groups)
        if m.shape[0] == 0 or nq == 0:
            return torch.full((nq, g), float("inf")), torch.full((nq,), -1, dtype=torch.int64)
        # the shortlist is by raw centre-patch distance (also a filter: ranking it by the
        # ratio below instead found more matches for defects too, detection 0.72 -> 0.57)
        cd = self._centre_distances(q, m, allowed)
        s = min(self.shortlist, m.shape[0])
        cd_s, idx = _smallest(cd, s)
        d = shortlist_block_distances(q, qv, m, mv, idx, self._groups)  # (Q, s, G)
        d = d.masked_fill(~torch.isfinite(cd_s)[..., None], float("inf"))
        rows = torch.arange(nq)
        if per_group:
            best_d, best = d.min(1)
            return best_d, torch.where(torch.isfinite(best_d[:, 0]), idx[rows, best[:, 0]], -1)
        if rank_by is None:
            key = d.square().sum(-1)
        else:
            r = rank_by[idx]  # (Q, s, G)
            tol = _copy_tolerance(q)[:, None, None]
            key = torch.where(r > 0, d / r.clamp_min(1e-12), torch.where(d <= tol, 0.0, float("inf"))).amax(-1)
        best = key.argmin(1)
        out_d = d[rows, best]
        ok = torch.isfinite(key[rows, best]) if rank_by is not None else torch.isfinite(out_d[:, 0])
        return out_d, torch.where(ok, idx[rows, best], torch.full_like(best, -1))

    # -- scoring ------------------------------------------------------------------------
    def _search(self, q: torch.Tensor, qv: torch.Tensor, allowed: torch.Tensor | None, cutoff: float,
                tol: torch.Tensor, threads: int, pipeline: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Scoring's search of the accepted blocks: per query block the (G,) distances, index
        and ratio of its best block, as :meth:`_nearest` with ``rank_by=scale`` finds it, but
        only among ratios <= ``cutoff`` (above it: none, ratio inf); and the mark flags of the
        blocks searched (:meth:`distinct_blocks`). None: not compiled here, or an empty memory.

        ``threads``: PyTorch threads for the centre-patch product. ``pipeline``: a second core
        is free (the embedding ran on another runtime; PyTorch's pool sleeps): with rows
        enough, half of them go to a worker thread of our own, product and search (one
        compiled call, the GIL released), while this thread does the other half, the product
        on one PyTorch thread. Marked cells, benchmark: +1.90 -> +1.31 ms per cell, +2.24 ->
        +1.55 ms on the station's path. Not after PyTorch's own CNN: its threads, still
        spinning, took the worker's core (+1.41 -> +2.02 ms on that path), so there the
        product uses PyTorch's threads instead. Row by row the same computation."""
        bounds = _contiguous_bounds(self._groups)
        if bounds is None or _compiled() is None or len(self) == 0:
            return None
        nq, g = q.shape[0], len(self._groups)
        k = min(self.shortlist, len(self))
        idx, val = np.empty((nq, k), np.int64), np.empty((nq, k), np.float32)
        best, key, out_d = np.empty(nq, np.int64), np.empty(nq, np.float32), np.empty((nq, g), np.float32)
        m_, mv_, scale, distinct = self._search_arrays()
        qn, qvn, toln = (np.ascontiguousarray(t.numpy()) for t in (q, qv, tol))

        def product(lo: int, hi: int, n_threads: int = 1) -> np.ndarray:
            part = None if allowed is None else allowed[lo:hi]
            return self._centre_distances(q[lo:hi], self.blocks, part, n_threads).numpy()

        def search(lo: int, hi: int, cd: np.ndarray) -> None:
            _search_kernel(cd, k, qn[lo:hi], qvn[lo:hi], m_, mv_, bounds, scale, toln[lo:hi], float(cutoff),
                           idx[lo:hi], val[lo:hi], best[lo:hi], key[lo:hi], out_d[lo:hi])

        if not pipeline or nq < PIPELINE_ROWS:
            search(0, nq, product(0, nq, threads))
            return out_d, best, key, distinct
        half = nq // 2
        self._centres(self.blocks)  # cached once here, not by both threads at once
        handed = _second_core().submit(lambda: search(half, nq, product(half, nq)))
        try:
            search(0, half, product(0, half))
        finally:
            handed.result()  # never return while the worker still writes into these arrays
        return out_d, best, key, distinct

    def _search_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The accepted blocks, their valid cells, radii and mark flags (:meth:`distinct_blocks`)
        as contiguous numpy arrays, kept while those four tensors are the same (converting
        them for every scored image cost tens of microseconds)."""
        key = (self.blocks, self.valid, self.scale, self.distinct_blocks())
        cached = self._arrays
        if cached is None or any(a is not b for a, b in zip(cached[0], key)):
            cached = (key, tuple(np.ascontiguousarray(t.numpy()) for t in key))
            self._arrays = cached
        return cached[1]

    def match(self, q: torch.Tensor, qv: torch.Tensor, q_pos: torch.Tensor | None, threads: int = 1,
              pipeline: bool = False) -> MemoryMatch:
        """Gate factors of query blocks (Q, 9, C) / valid (Q, 9) at grid positions (Q, 2)
        (needed only with a ``radius``). (After the search: compiled, or numpy on a hundred
        values, where each tensor call cost more.)"""
        allowed = None
        if self.radius is not None:
            if q_pos is None:
                raise ValueError("a memory with a radius needs the query blocks' positions")
            allowed = (q_pos[:, None, :] - self.pos[None, :, :]).abs().amax(-1) <= self.radius
        # nothing above the ramp's top (factor 1) or the growth limits can change a distance
        cutoff = max(self.high, self.grow or 0.0, self.footprint or 0.0)
        tol = _copy_tolerance(q)
        found = self._search(q, qv, allowed, cutoff, tol, threads, pipeline)
        distinct = None
        if found is not None:
            d_acc, i_acc, ratio, mark = found
            acc_total = np.sqrt(np.square(d_acc).sum(-1))  # numpy's sum, as the defect blocks' below
            factor, is_distinct = np.empty(ratio.shape[0], np.float32), np.empty(ratio.shape[0], bool)
            _gate_kernel(ratio, i_acc, mark, self.low, self.high - self.low, self.distinct, factor, is_distinct)
            if self.distinct:
                distinct = torch.from_numpy(is_distinct)
        else:
            r = self.scale
            d_acc_t, i_acc_t = self._nearest(q, qv, self.blocks, self.valid, allowed, rank_by=r)
            r_best = r[i_acc_t.clamp_min(0)] if len(self) else torch.zeros_like(d_acc_t)
            per = torch.where(r_best > 0, d_acc_t / r_best.clamp_min(1e-12),
                              torch.where(d_acc_t <= tol[:, None], 0.0, float("inf")))
            ratio_t = torch.where(i_acc_t >= 0, per.amax(-1), torch.full((q.shape[0],), float("inf")))
            d_acc, i_acc, ratio = d_acc_t.numpy(), i_acc_t.numpy(), ratio_t.numpy()
            acc_total = np.sqrt(np.square(d_acc).sum(-1))
            factor = np.clip((ratio - self.low) / (self.high - self.low), 0.0, 1.0).astype(np.float32)
            if self.distinct and len(self):
                distinct = (i_acc >= 0) & self.distinct_blocks().numpy()[np.maximum(i_acc, 0)]
                factor[~distinct] = 1.0
                distinct = torch.from_numpy(distinct)
        if self.n_defect_blocks:
            d_neg = self._nearest(q, qv, self.neg_blocks, self.neg_valid, None)[0].numpy()
            neg_total = np.sqrt(np.square(d_neg).sum(-1))
            factor[neg_total <= acc_total] = 1.0
        else:
            neg_total = np.full_like(acc_total, np.inf)
        return MemoryMatch(torch.from_numpy(factor), torch.from_numpy(ratio), torch.from_numpy(acc_total),
                           torch.from_numpy(neg_total), torch.from_numpy(i_acc), distinct)

    def apply(self, emb: torch.Tensor, dist: torch.Tensor, pixel_threshold: float | None = None,
              threads: int = 1, pipeline: bool = False) -> torch.Tensor:
        """(B, C, h, w) embeddings, (B, h, w) model distances -> distances with the memory's
        gate applied to each image's ``candidates`` highest patches. ``threads``: PyTorch
        threads for the centre-patch product (everything else runs on this one); more than
        one only where PyTorch's pool is awake anyway (its CNN ran). ``pipeline``: a second
        core is free for a worker of the look-up's own (see :meth:`_search`)."""
        if len(self) == 0:
            return dist
        with one_torch_thread():  # small tensor ops: thread hand-offs cost more than they save
            floor = None if pixel_threshold is None else self.floor * pixel_threshold
            return self._apply(emb, dist, floor, threads, pipeline)

    def _apply(self, emb: torch.Tensor, dist: torch.Tensor, floor: float | None, threads: int = 1,
               pipeline: bool = False) -> torch.Tensor:
        b, c, h, w = emb.shape
        k = min(self.candidates, h * w)
        flat = dist.reshape(b, -1)
        flat_np = flat.numpy()
        hot = None if floor is None else flat_np >= floor
        if hot is not None and int(hot.sum(1).max()) <= k:
            # every hot patch is a candidate (the usual case): no ranking needed. (np.nonzero of
            # a 2-D array gives strided views: the kernels get copies laid out as the warm-up's,
            # else numba compiles them again at the first look-up, 1-2 s into the first click.)
            img_np, idx_np = (np.ascontiguousarray(a) for a in np.nonzero(hot))
            if idx_np.size == 0:
                return dist
        else:
            val, top = flat.topk(k, dim=1)  # (B, k)
            keep = torch.ones_like(top, dtype=torch.bool) if floor is None else val >= floor
            if not bool(keep.any()):
                return dist
            img_np = torch.arange(b)[:, None].expand_as(top)[keep].numpy()
            idx_np = top[keep].numpy()
        img, idx = torch.from_numpy(img_np), torch.from_numpy(idx_np)
        q, qv = _query_blocks(emb, img_np, idx_np, self.step)
        pos = None if self.radius is None else torch.from_numpy(np.stack([idx_np // w, idx_np % w], 1))
        m = self.match(q, qv, pos, threads, pipeline)
        grows = self.grow is not None or self.footprint is not None
        factor = (self._grown(m, img, idx, (h, w)) if grows else m.factor).numpy()
        out = flat_np.copy()
        out[img_np, idx_np] = flat_np[img_np, idx_np] * factor.astype(flat_np.dtype)
        return torch.from_numpy(out).reshape(dist.shape)

    def _grown(self, m: MemoryMatch, img: torch.Tensor, idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Factors with the patches of each confident match's print set to 0. A confident
        match: ratio <= ``low``, not blocked by a defect block, and (with ``distinct``) on a
        block of the mark itself. Its print: looked-up patches of ratio <= ``grow``
        8-connected to it through such patches, and those of ratio <= ``footprint`` inside
        the outline of the matched print (:meth:`_outline`). Compiled
        (:func:`core._block_kernel.print_hits`), else numpy (a few hundred patches, where each
        tensor call costs more than its arithmetic)."""
        h, w = grid
        ratio, free = m.ratio.numpy(), ~m.blocked.numpy()
        seed = free & (ratio <= self.low)
        if m.distinct is not None:
            seed &= m.distinct.numpy()
        if not seed.any():
            return m.factor
        near = free & (ratio <= self.grow) if self.grow is not None else seed
        within = free & (ratio <= self.footprint) if self.footprint is not None and m.best is not None else None
        img_np, idx_np = img.numpy(), idx.numpy()
        factor = m.factor.numpy().copy()
        if _compiled() is not None:
            no = np.zeros_like(seed)
            best = np.zeros(len(seed), np.int64) if m.best is None else m.best.numpy()
            groups = self._print_groups() if within is not None else (no.astype(np.int64),) * 4 + (
                np.zeros((1, 2), np.int64),)
            grow, outline = self.grow is not None, within is not None
            within = no if within is None else within
            if img_np[0] == img_np[-1] and bool((img_np == img_np[0]).all()):  # one image (batch 1: the usual)
                hit = np.empty(len(img_np), bool)
                _print_kernel(idx_np, seed, near, within, best, *groups, h, w, grow, outline, hit)
                factor[hit] = 0.0
                return torch.from_numpy(factor)
            for i in np.unique(img_np[seed]):
                rows = np.nonzero(img_np == i)[0]
                hit = np.empty(len(rows), bool)
                _print_kernel(idx_np[rows], seed[rows], near[rows], within[rows], best[rows], *groups, h, w,
                              grow, outline, hit)
                factor[rows[hit]] = 0.0
            return torch.from_numpy(factor)
        for i in np.unique(img_np[seed]):
            rows = img_np == i
            hit = np.zeros_like(rows)
            if self.grow is not None:
                grid_near = np.zeros(h * w, np.uint8)
                grid_near[idx_np[rows & near]] = 1
                n_labels, labels = cv2.connectedComponents(grid_near.reshape(h, w), connectivity=8)
                labels = labels.reshape(-1)
                seeded = np.zeros(n_labels, bool)  # the components holding a seed
                seeded[labels[idx_np[rows & seed]]] = True
                hit |= rows & near & seeded[labels[idx_np]]
            if within is not None:
                outline = self._outline(idx_np[rows & seed], m.best.numpy()[rows & seed], grid)
                hit |= rows & within & outline[idx_np]
            factor[hit] = 0.0
        return torch.from_numpy(factor)

    def _print_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The accepted blocks grouped by print (:meth:`_prints`), kept until blocks change."""
        if self._members is None or self._members[0].shape[0] != len(self):
            self._members = self._prints()
        return self._members

    def _outline(self, at: np.ndarray, best: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """(h * w,) bool: where the prints lie whose patches ``at`` (flat indices) matched the
        accepted blocks ``best`` confidently: the print each block belongs to, moved so the
        block sits on its match, widened by one patch (rotation, scale). A print is the part
        of its click's accepted patches connected to the block (gaps of one patch bridged): a
        region click is one print, but a whole "part is OK" click accepts scattered hot
        patches, and one match must not outline them all. In numpy: a handful of seeds per
        image, where tensor calls would cost more than the arithmetic."""
        h, w = grid
        order, first, counts, print_of, pos = self._print_groups()
        shift = np.stack([at // w, at % w], 1) - pos[best]
        # the distinct (print, dy, dx) moves, through one integer key (a row-wise unique is slow)
        key = (print_of[best] * (2 * h) + shift[:, 0] + h) * (2 * w) + shift[:, 1] + w
        key = np.unique(key)
        moves = np.stack([key // (4 * h * w), (key // (2 * w)) % (2 * h) - h, key % (2 * w) - w], 1)
        n = counts[moves[:, 0]]
        move = np.repeat(np.arange(len(moves)), n)
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        target = pos[order[first[moves[move, 0]] + within]] + moves[move, 1:]
        inside = (target[:, 0] >= 0) & (target[:, 0] < h) & (target[:, 1] >= 0) & (target[:, 1] < w)
        mask = np.zeros((h, w), np.uint8)
        mask[target[inside, 0], target[inside, 1]] = 1
        mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
        return mask.view(bool).reshape(-1)

    def _prints(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The accepted blocks grouped by print (see :meth:`_outline`), for ``_members``."""
        h, w = self.grid
        click, pos = self.click.numpy(), self.pos.numpy()
        print_of = np.zeros(len(click), np.int64)
        n_prints = 0
        for c in np.unique(click):
            rows = np.nonzero(click == c)[0]
            canvas = np.zeros((h, w), np.uint8)
            canvas[pos[rows, 0], pos[rows, 1]] = 1
            bridged = cv2.dilate(canvas, np.ones((3, 3), np.uint8))  # a one-patch gap joins
            n, labels = cv2.connectedComponents(bridged, connectivity=8)
            print_of[rows] = n_prints + labels[pos[rows, 0], pos[rows, 1]] - 1
            n_prints += n - 1
        order = np.argsort(print_of, kind="stable")
        counts = np.bincount(print_of, minlength=n_prints)
        return order, np.cumsum(counts) - counts, counts, print_of, pos


def _copy_tolerance(q: torch.Tensor) -> torch.Tensor:
    """(Q,) distance under which a block counts as a copy of an accepted one when no scale is
    known (one click): 0.1 % of its centre patch's norm, so re-embedding the same image (other
    batch size, float rounding) still matches."""
    c = q[:, _CENTRE].numpy()
    return torch.from_numpy(1e-3 * np.sqrt(np.square(c).sum(1)))


def _query_blocks(emb: torch.Tensor, img: np.ndarray, idx: np.ndarray, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring's query blocks: :func:`_gather_blocks` of embeddings (B, C, h, w) at images
    ``img`` (K,) and flat patch indices ``idx`` (K,), in one compiled pass where numba is
    there."""
    if _compiled() is None:
        return _gather_blocks(emb.to(torch.float32), torch.from_numpy(img), torch.from_numpy(idx), step)
    e = np.ascontiguousarray(emb.detach().to(torch.float32).numpy())
    k, c = idx.shape[0], e.shape[1]
    feats, valid = np.empty((k, 9, c), np.float32), np.empty((k, 9), bool)
    _gather_kernel(e, img.astype(np.int64, copy=False), idx.astype(np.int64, copy=False), int(step), feats, valid)
    return torch.from_numpy(feats), torch.from_numpy(valid)


def _gather_blocks(emb: torch.Tensor, img: torch.Tensor, idx: torch.Tensor, step: int = 1,
                   valid_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of selected patches: (B, C, h, w), image (K,) and flat patch indices (K,)
    -> ((K, 9, C) features, (K, 9) valid). A cell is valid on the grid and, with
    ``valid_map`` (h, w) bool (one image), inside it; invalid cells are zero."""
    b, c, h, w = emb.shape
    idx_np, img_np = idx.numpy(), img.numpy()
    rr = (idx_np // w)[:, None] + step * _OFFSETS_NP[None, :, 0]
    cc = (idx_np % w)[:, None] + step * _OFFSETS_NP[None, :, 1]
    valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    rr, cc = rr.clip(0, h - 1), cc.clip(0, w - 1)
    if valid_map is not None:
        valid &= valid_map.to(torch.bool).numpy()[rr, cc]
    # channels last first (of the images looked up only): each cell's C values are then one
    # contiguous read, where gathering across the channel stride cost more than the copy
    emb_np = emb.detach().numpy()
    if b > 1:
        used, img_np = np.unique(img_np, return_inverse=True)
        emb_np = emb_np[used]
    feats = np.ascontiguousarray(emb_np.transpose(0, 2, 3, 1))[img_np[:, None], rr, cc]  # (K, 9, C)
    feats[~valid] = 0.0
    return torch.from_numpy(feats), torch.from_numpy(valid)
