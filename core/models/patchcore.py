"""PatchCore: a memory bank of locally aware OK patch features, nearest-neighbour distance.

Fit collects every OK patch (each embedding averaged over its 3x3 neighbourhood, so a patch
"sees" a little context), then :meth:`finalize` keeps a coreset: k-center greedy picks the
patch farthest from everything picked so far, ``coreset_ratio`` of them (default 10%). The
greedy search runs on a seeded random projection of the features (``projection_dim``,
default 128, only used when the embedding is wider) and updates the running minimum
distance with one chunked matrix-vector product per pick. The full collected bank is freed
once the coreset exists. The score of a patch is the Euclidean distance to its nearest
memory item (chunked matrix products; the winner's distance is recomputed exactly).

Feedback (``partial_fit`` after ``finalize``, "this is OK") appends the new patches straight
to the memory bank without re-subsampling, so the next image already benefits. That is not
what a refit would give (a refit would subsample them), hence ``exact_incremental = False``.

Image score: the station pools the patch-distance map (max / top-k mean / blob) like for
every other model. The paper's reweighting of the worst patch by how isolated its nearest
memory item is (eq. 7) is available as :meth:`PatchcoreModel.image_scores` for callers that
want it; the detector does not use it.

Reference: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from .base import NormalityModel, local_features

#: rows of the bank / queries handled per matrix product (bounds temporary memory)
_CHUNK = 8192


def _rows(emb: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C), image-major then row-major patch order."""
    b, c, h, w = emb.shape
    return emb.permute(0, 2, 3, 1).reshape(b * h * w, c)


def nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest bank row of each query row: (distances (Q,), indices (Q,)).

    Candidates come from ``|m|^2 - 2 q.m`` (fast, one matrix product per chunk);
    the winner's distance is then recomputed as ``|q - m|`` so it is exact, not cancelled.
    """
    q_n = queries.shape[0]
    best = torch.full((q_n,), float("inf"), dtype=torch.float32)
    arg = torch.zeros(q_n, dtype=torch.int64)
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    bank_sq = (bank * bank).sum(1)
    for qs in range(0, q_n, chunk):
        q = queries[qs : qs + chunk]
        b_best = best[qs : qs + chunk]
        b_arg = arg[qs : qs + chunk]
        for ms in range(0, bank.shape[0], chunk):
            m = bank[ms : ms + chunk]
            # |m|^2 - 2 q.m: the per-query |q|^2 does not change which m is nearest
            d2 = torch.addmm(bank_sq[None, ms : ms + chunk], q, m.T, alpha=-2.0)
            val, idx = d2.min(1)
            better = val < b_best
            b_best[better] = val[better]
            b_arg[better] = idx[better] + ms
    dist = (queries - bank[arg]).norm(dim=1)
    return dist, arg


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch on ``n`` threads inside the block (restored after)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def one_torch_thread() -> AbstractContextManager[None]:
    """PyTorch on one thread inside the block (restored after). Per-pick work is small vector
    ops: thread hand-offs cost more than they save (measured
    8 ms vs 0.03 ms for a 157k-element minimum on 2 busy cores)."""
    return torch_threads(1)


def kcenter_greedy(x: torch.Tensor, n_pick: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n_pick`` rows of ``x`` (N, d) chosen by k-center greedy: start at a
    seeded random row, then repeatedly take the row farthest from all rows taken so far.

    Each row remembers its nearest centre; a new centre c can only come closer to row i if
    ``|c - centre(i)| < 2 * r_i`` (triangle inequality), so only those rows are re-measured.
    Same picks as the plain algorithm (up to float ties), several times faster once the
    radii shrink.
    """
    n = x.shape[0]
    if n_pick >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    with one_torch_thread():
        x = x.to(torch.float32).contiguous()
        x_sq = (x * x).sum(1)
        assign = torch.zeros(n, dtype=torch.int64)
        centres = torch.empty(n_pick, x.shape[1])
        centres_sq = torch.empty(n_pick)
        picked = torch.empty(n_pick, dtype=torch.int64)
        cur = int(torch.randint(n, (1,), generator=g))
        min_d = torch.addmv(x_sq, x, x[cur], alpha=-2.0).add_(x_sq[cur]).clamp_min_(0.0)  # squared
        for i in range(n_pick):
            c, c_sq = x[cur], x_sq[cur]
            picked[i] = cur
            centres[i], centres_sq[i] = c, c_sq
            if i > 0:
                cc = torch.addmv(centres_sq[:i], centres[:i], c, alpha=-2.0).add_(c_sq).clamp_min_(0.0)
                cand = torch.nonzero(cc[assign] < 4.0 * min_d * (1.0 + 1e-4) + 1e-6).squeeze(1)
                if cand.numel() > n // 4:  # gathering rows costs more than measuring them all
                    d = torch.addmv(x_sq, x, c, alpha=-2.0).add_(c_sq).clamp_min_(0.0)
                    better = d < min_d
                    min_d = torch.where(better, d, min_d)
                    assign.masked_fill_(better, i)
                else:
                    d = torch.addmv(x_sq.index_select(0, cand), x.index_select(0, cand), c, alpha=-2.0)
                    d.add_(c_sq).clamp_min_(0.0)
                    better = d < min_d.index_select(0, cand)
                    idx = cand[better]
                    min_d[idx] = d[better]
                    assign[idx] = i
            min_d[cur] = 0.0
            assign[cur] = i
            cur = int(torch.argmax(min_d))
    return picked


class PatchcoreModel(NormalityModel):
    kind = "patchcore"
    summary = "memory bank of OK patches (k-center coreset), nearest-neighbour distance (PatchCore)"
    exact_incremental = False
    #: Detector.create passes the stage of each channel and each stage's stride relative to
    #: the finest, so every stage is pooled over the same image neighbourhood (see _features)
    needs_channel_stage = True
    needs_stage_strides = True
    #: accepted ranges (lo, hi, whole number; lists: each item), checked by DetectorConfig
    param_ranges = {"coreset_ratio": (1e-3, 1.0, False), "projection_dim": (1, 4096, True),
                    "neighbourhood": (1, 15, True), "seed": (0, 2**32 - 1, True), "channel_stage": (0, 9, True),
                    "stage_strides": (1, 64, True)}

    def check_fit_size(self, n_images: int) -> None:
        """The coreset must keep at least a quarter of one image's patches."""
        total = n_images * self.n_patches
        keep = max(1, int(round(self.coreset_ratio * total)))
        need = min(max(1, self.n_patches // 4), total)
        if keep < need:
            raise ValueError(f"model 'patchcore' parameter coreset_ratio {self.coreset_ratio:g} keeps {keep} of "
                             f"{total} patches from {n_images} OK images; at least {need} are needed: use "
                             f"coreset_ratio >= {need / total:.3g} or add OK images")

    def __init__(
        self,
        grid: tuple[int, int],
        n_channels: int,
        coreset_ratio: float = 0.1,
        projection_dim: int = 256,
        neighbourhood: int = 3,
        seed: int = 0,
        channel_stage: list[int] | None = None,
        stage_strides: list[int] | None = None,
    ) -> None:
        super().__init__(grid, n_channels)
        if not 0.0 < float(coreset_ratio) <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if int(projection_dim) < 1 or int(neighbourhood) < 1 or int(neighbourhood) % 2 == 0:
            raise ValueError("projection_dim must be >= 1 and neighbourhood an odd number >= 1")
        self.coreset_ratio = float(coreset_ratio)
        self.projection_dim = int(projection_dim)
        self.neighbourhood = int(neighbourhood)
        self.seed = int(seed)
        self.channel_stage = None if channel_stage is None else [int(c) for c in channel_stage]
        self.stage_strides = None if stage_strides is None else [int(r) for r in stage_strides]
        if self.channel_stage is not None and len(self.channel_stage) != self.n_channels:
            raise ValueError(f"channel_stage has {len(self.channel_stage)} entries for {self.n_channels} channels")
        #: (N, C) float32 memory bank; None until the first finalize
        self.bank: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []  # collected patches before the coreset
        self._images = 0

    def params(self) -> dict[str, Any]:
        return {"coreset_ratio": self.coreset_ratio, "projection_dim": self.projection_dim,
                "neighbourhood": self.neighbourhood, "seed": self.seed,
                "channel_stage": self.channel_stage, "stage_strides": self.stage_strides}

    @property
    def n_samples(self) -> int:
        return self._images

    def _features(self, emb: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features, each stage pooled over the same image area.

        The paper pools every stage at its own resolution before upsampling; the embedding
        here is already upsampled to the finest grid, so a stage with stride ratio r gets a
        kernel of r*(n-1)+1 fine cells, the footprint of n native cells (measured on the demo
        data: AUROC 0.955 -> 0.962 against uniform 3x3 pooling).
        """
        emb = emb.to(torch.float32)
        if self.channel_stage is None or self.stage_strides is None:
            return local_features(emb, self.neighbourhood)
        out = torch.empty_like(emb)
        stages = torch.tensor(self.channel_stage)
        for s, ratio in enumerate(self.stage_strides):
            idx = torch.nonzero(stages == s).flatten()
            if idx.numel():
                size = ratio * (self.neighbourhood - 1) + 1
                out[:, idx] = local_features(emb.index_select(1, idx), size)
        return out

    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        rows = _rows(self._features(emb))
        if patch_mask is not None:
            keep = patch_mask.reshape(-1).to(torch.bool)
            rows = rows[keep]
            self._images += int(patch_mask.reshape(patch_mask.shape[0], -1).any(1).sum())
        else:
            self._images += emb.shape[0]
        rows = rows.contiguous().clone()
        if self.bank is None:
            self._pending.append(rows)
        else:  # feedback after fitting: straight into the bank, no re-subsampling
            self.bank = torch.cat([self.bank, rows])

    def finalize(self) -> None:
        if not self._pending:
            if self.bank is None:
                raise ValueError("no OK patches collected before finalize")
            return
        full = torch.cat(self._pending)
        self._pending = []
        full = self.coreset(full, max(1, int(round(self.coreset_ratio * full.shape[0]))))
        self.bank = full if self.bank is None else torch.cat([self.bank, full])

    def coreset(self, rows: torch.Tensor, n_pick: int) -> torch.Tensor:
        """``n_pick`` of ``rows`` (N, C) by k-center greedy on the seeded projection; also
        the last step of a sharded fit, over the union of the shards' coresets
        (:mod:`core.shards`)."""
        if n_pick >= rows.shape[0]:
            return rows
        proj = rows
        if rows.shape[1] > self.projection_dim:
            g = torch.Generator().manual_seed(self.seed)
            w = torch.randn(rows.shape[1], self.projection_dim, generator=g) / self.projection_dim**0.5
            proj = rows @ w
        idx = kcenter_greedy(proj, n_pick, self.seed)
        del proj
        return rows[idx].contiguous()

    def _query(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None or self._pending:
            self.finalize()
        assert self.bank is not None
        bank = self.bank
        q = _rows(self._features(self.weighted(emb.to(torch.float32))))
        if self.channel_weights is not None:
            bank = bank * self.channel_weights
        return q, bank

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        q, bank = self._query(emb)
        dist, _ = nearest(q, bank)
        return dist.reshape(emb.shape[0], *self.grid)

    def image_scores(self, emb: torch.Tensor, num_neighbors: int = 9) -> torch.Tensor:
        """(B,) image scores with the paper's reweighting (eq. 7): the worst patch's distance
        s* to its nearest memory item m*, times ``1 - softmax`` weight of how close m* is to
        its own ``num_neighbors`` nearest bank items (an isolated m* weighs more)."""
        q, bank = self._query(emb)
        dist, arg = nearest(q, bank)
        b = emb.shape[0]
        dist, arg = dist.reshape(b, -1), arg.reshape(b, -1)
        worst = dist.argmax(1)
        s_star = dist[torch.arange(b), worst]
        m_star = bank[arg[torch.arange(b), worst]]  # (B, C)
        k = min(num_neighbors, bank.shape[0])
        d_bank = torch.cdist(m_star, bank)  # (B, N)
        nn_m = bank[d_bank.topk(k, largest=False).indices]  # (B, k, C) incl. m* itself
        d_q = (q.reshape(b, -1, q.shape[1])[torch.arange(b), worst][:, None, :] - nn_m).norm(dim=2)  # (B, k)
        weight = 1.0 - torch.softmax(d_q, dim=1)[:, 0]
        return weight * s_star

    def copy(self) -> PatchcoreModel:
        clone = PatchcoreModel(self.grid, self.n_channels, **self.params())
        clone.bank = None if self.bank is None else self.bank.clone()
        clone._pending = [p.clone() for p in self._pending]
        clone._images = self._images
        clone.set_channel_weights(None if self.channel_weights is None else self.channel_weights.clone())
        return clone

    def tensors(self) -> dict[str, torch.Tensor]:
        """The memory bank; collected patches are subsampled first (finalize)."""
        if self._pending or self.bank is None:
            self.finalize()
        assert self.bank is not None
        return {"bank": self.bank, "n_images": torch.tensor([self._images], dtype=torch.int64)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bank = tensors["bank"].to(torch.float32).contiguous()
        self._images = int(tensors["n_images"].reshape(-1)[0])
        self._pending = []

    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        bank = tensors.get("bank")
        n = int(bank.shape[0]) if bank is not None and bank.dim() == 2 else 0
        return {"bank": (max(n, 1), self.n_channels), "n_images": (1,)}
