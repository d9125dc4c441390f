"""Per-patch mixture: K Gaussians per patch position (k-means clusters), nearest component.

One Gaussian per patch is too wide when OK parts look several ways at the same place (a pin
that is sometimes lit, sometimes in shadow): the covariance has to cover all of them and a
defect in between goes unnoticed. Here each patch position gets ``components`` clusters
(k-means, batched over all patch positions: seeded k-means++ initialisation, then Lloyd
iterations), each with its own covariance + epsilon*I, and the score of a patch is the
Mahalanobis distance to the nearest component.

Fitting needs all OK embeddings at once, so :meth:`partial_fit` before the first
:meth:`finalize` only stores them (float32, N x C x h x w) and ``finalize`` clusters.
Afterwards (feedback, "this is OK") each new patch is merged into the Gaussian statistics of
its nearest component (Mahalanobis), exactly like PaDiM merges into its one Gaussian; the
clusters are not re-run, so this is not a refit (``exact_incremental = False``).
Components left without samples (fewer distinct OK samples than K) are ignored.

Each component's covariance needs more samples than channels: with 200 OK images, K = 3 and
100 channels a component sees ~67 samples and its covariance is mostly epsilon, so every
unusual direction of an OK patch scores high (poly cells: AUROC 0.843 against PaDiM's 0.928,
0.886 with 600 images; README, "Which model"). ``tied=1`` gives all components of a position
one covariance, pooled from every sample's distance to its own component's mean (a Gaussian
mixture with tied covariance): the components differ in where they sit, not in shape, and
the covariance is estimated from all N samples as PaDiM's is. ``neighbourhood`` averages each
patch over its n x n neighbourhood first, as PaDiM's does.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import NormalityModel, local_features, patches_first
from .gaussian import GaussianStats, precision_from_covariance
from .mahalanobis import mahalanobis, pack_symmetric


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x (P, N, C), c (P, K, C) -> (P, N, K) squared Euclidean distances."""
    d = (x * x).sum(-1, keepdim=True) - 2.0 * torch.bmm(x, c.transpose(1, 2)) + (c * c).sum(-1)[:, None, :]
    return d.clamp_min_(0.0)


def batched_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iterations: int = 30,
                   seed: int = 0) -> torch.Tensor:
    """k-means for every patch at once. x (P, N, C) float, w (P, N) 0/1 sample weights.
    Returns assignments (P, N) int64 in [0, k) (meaningless where w == 0)."""
    p, n, _ = x.shape
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(p)
    # k-means++: first centre uniform among the valid samples, then proportional to D^2
    first = torch.multinomial(w + 1e-12, 1, generator=g).squeeze(1)
    centres = [x[rows, first]]
    d2 = _sq_dist(x, centres[0][:, None, :])[..., 0]
    for _ in range(1, k):
        prob = d2 * w
        prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, w) + 1e-12  # all duplicates
        nxt = torch.multinomial(prob, 1, generator=g).squeeze(1)
        centres.append(x[rows, nxt])
        d2 = torch.minimum(d2, _sq_dist(x, centres[-1][:, None, :])[..., 0])
    c = torch.stack(centres, 1)  # (P, K, C)
    assign = _sq_dist(x, c).argmin(2)
    for _ in range(iterations):
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype) * w[..., None]  # (P, N, K)
        counts = onehot.sum(1)  # (P, K)
        sums = torch.bmm(onehot.transpose(1, 2), x)  # (P, K, C)
        c = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], c)
        new = _sq_dist(x, c).argmin(2)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


class KMeansPadimModel(NormalityModel):
    kind = "padim-kmeans"
    summary = "K Gaussians per patch (k-means clusters), Mahalanobis to the nearest (multi-modal OK)"
    exact_incremental = False
    uses_mahalanobis = True
    #: accepted ranges (lo, hi, whole number), checked by DetectorConfig
    param_ranges = {"components": (1, 16, True), "epsilon": (1e-8, 1e4, False), "iterations": (0, 1000, True),
                    "seed": (0, 2**32 - 1, True), "tied": (0, 1, True), "neighbourhood": (1, 15, True)}

    def check_fit_size(self, n_images: int) -> None:
        """Each component needs OK images of its own: more components than images leaves
        some empty (quietly ignored), a degenerate mixture."""
        if self.components > n_images:
            raise ValueError(f"model 'padim-kmeans' parameter components is {self.components} but only "
                             f"{n_images} OK images are fitted: use at most {max(n_images, 1)} components "
                             "or add OK images")

    def __init__(self, grid: tuple[int, int], n_channels: int, components: int = 3, epsilon: float = 0.01,
                 iterations: int = 30, seed: int = 0, tied: int = 0, neighbourhood: int = 1) -> None:
        super().__init__(grid, n_channels)
        if int(components) < 1 or int(iterations) < 0:
            raise ValueError("components must be >= 1 and iterations >= 0")
        if int(tied) not in (0, 1):
            raise ValueError(f"tied must be 0 (a covariance per component) or 1 (one per position), got {tied}")
        if int(neighbourhood) < 1 or int(neighbourhood) % 2 == 0:
            raise ValueError(f"neighbourhood must be an odd number >= 1, got {neighbourhood}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.components = int(components)
        self.epsilon = float(epsilon)
        self.iterations = int(iterations)
        self.seed = int(seed)
        #: 1: one covariance per position shared by its components (pooled within-cluster)
        self.tied = int(tied)
        #: each patch's features averaged over its n x n neighbourhood before clustering
        self.neighbourhood = int(neighbourhood)
        #: per (patch, component) statistics, rows p*K + k; None until the first finalize
        self.stats: GaussianStats | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._means: torch.Tensor | None = None  # (P, K, C) float32
        #: (K, P, C (C + 1) / 2) float32 packed precisions, component-major so that one
        #: component's matrices are contiguous for the scoring kernel
        self._precisions: torch.Tensor | None = None
        self._valids: torch.Tensor | None = None  # (P, K) bool
        self._dirty: torch.Tensor | None = None  # (P*K,) components updated since _derive

    def params(self) -> dict[str, Any]:
        return {"components": self.components, "epsilon": self.epsilon, "iterations": self.iterations,
                "seed": self.seed, "tied": self.tied, "neighbourhood": self.neighbourhood}

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """What the components describe: the embedding, each patch averaged over its
        ``neighbourhood`` (as PaDiM's ``neighbourhood``)."""
        emb = emb.to(torch.float32)
        return emb if self.neighbourhood <= 1 else local_features(emb, self.neighbourhood)

    def weighted(self, emb: torch.Tensor) -> torch.Tensor:
        """Channel weights applied to :meth:`features` (weights and the mean commute)."""
        return super().weighted(self.features(emb))

    @property
    def n_samples(self) -> int:
        if self.stats is not None:
            return int(self.stats.count.view(self.n_patches, self.components).sum(1).max())
        return sum(int(e.shape[0]) for e, _ in self._pending)

    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        if self.stats is None:
            self._pending.append((self.features(emb).clone(),
                                  None if patch_mask is None else patch_mask.to(torch.bool).clone()))
            return
        # after fitting: merge every patch into its nearest component's Gaussian
        if self._stale:
            self._derive()
        p, k = self.n_patches, self.components
        feats = self.features(emb)
        x = patches_first(feats)  # (P, B, C)
        nearest = self._component_distances(patches_first(NormalityModel.weighted(self, feats))).argmin(2)
        weight = torch.nn.functional.one_hot(nearest, k).permute(0, 2, 1).to(torch.float64)  # (P, K, B)
        if patch_mask is not None:
            weight = weight * patches_first(patch_mask[:, None].to(torch.float64))[..., 0][:, None, :]
        xk = x[:, None].expand(p, k, *x.shape[1:]).reshape(p * k, *x.shape[1:])
        weight = weight.reshape(p * k, -1)
        self.stats.update(xk, weight)
        touched = weight.sum(1) > 0
        self._dirty = touched if self._dirty is None else self._dirty | touched

    def finalize(self) -> None:
        if self.stats is None:
            if not self._pending:
                raise ValueError("no OK samples collected before finalize")
            self._fit()
        self._derive()

    def _fit(self) -> None:
        emb = torch.cat([e for e, _ in self._pending])
        masks = [torch.ones(e.shape[0], *e.shape[2:], dtype=torch.bool) if m is None else m for e, m in self._pending]
        self._pending = []
        x = patches_first(emb)  # (P, N, C)
        del emb
        w = patches_first(torch.cat(masks)[:, None].to(torch.float32))[..., 0]  # (P, N)
        p, k = self.n_patches, self.components
        assign = batched_kmeans(x, w, k, self.iterations, self.seed)
        weight = torch.nn.functional.one_hot(assign, k).permute(0, 2, 1).to(torch.float64) * w[:, None, :]
        stats = GaussianStats.empty(p * k, self.n_channels)
        for j in range(k):  # one component at a time keeps the float64 copy of x at (P, N, C)
            rows = torch.arange(p) * k + j
            part = GaussianStats.empty(p, self.n_channels)
            part.update(x, weight[:, j])
            stats.count[rows], stats.mean[rows], stats.scatter[rows] = part.count, part.mean, part.scatter
        self.stats = stats

    @property
    def _stale(self) -> bool:
        return self._precisions is None or (self._dirty is not None and bool(self._dirty.any()))

    def _derive(self) -> None:
        """Means and precisions from the statistics; after a feedback update only the
        components that received samples are recomputed."""
        assert self.stats is not None
        p, k = self.n_patches, self.components
        self._valids = (self.stats.count >= 1).view(p, k)
        if not bool(self._valids.any(1).all()):
            raise ValueError("every patch needs at least one OK sample before scoring")
        if self._precisions is not None and self._means is not None and self._dirty is not None:
            rows = torch.nonzero(self._dirty).flatten()
            if rows.numel() and self.tied:
                positions = torch.unique(rows // k)
                packed = pack_symmetric(precision_from_covariance(self._tied_covariance(positions))).to(torch.float32)
                self._precisions[:, positions] = packed[None]
            elif rows.numel():
                cov = self.stats.covariance(self.epsilon, rows)
                self._precisions[rows % k, rows // k] = pack_symmetric(precision_from_covariance(cov)).to(torch.float32)
            self._means.view(p * k, -1)[rows] = self.stats.mean[rows].to(torch.float32)
        elif self.tied:
            packed = pack_symmetric(precision_from_covariance(self._tied_covariance())).to(torch.float32)
            self._precisions = packed[None].expand(k, *packed.shape).contiguous()
            self._means = self.stats.mean.to(torch.float32).view(p, k, self.n_channels).contiguous()
        else:
            packed = pack_symmetric(precision_from_covariance(self.stats.covariance(self.epsilon))).to(torch.float32)
            self._precisions = packed.view(p, k, -1).transpose(0, 1).contiguous()
            self._means = self.stats.mean.to(torch.float32).view(p, k, self.n_channels).contiguous()
        self._dirty = torch.zeros(p * k, dtype=torch.bool)

    def _tied_covariance(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(P', C, C) float64: each position's within-component scatter summed over its
        components, divided by its samples less one per component used, + epsilon*I."""
        assert self.stats is not None
        p, k, c = self.n_patches, self.components, self.n_channels
        count = self.stats.count.view(p, k)
        scatter = self.stats.scatter.view(p, k, c, c)
        if positions is not None:
            count, scatter = count[positions], scatter[positions]
        used = (count >= 1).sum(1).to(torch.float64)
        denom = (count.sum(1) - used).clamp_min(1.0)
        return scatter.sum(1) / denom[:, None, None] + self.epsilon * torch.eye(c, dtype=scatter.dtype)

    def _component_distances(self, x: torch.Tensor) -> torch.Tensor:
        """x (P, B, C) weighted-or-not samples -> (P, B, K) Mahalanobis distances (inf for
        empty components)."""
        assert self._precisions is not None and self._means is not None and self._valids is not None
        k = self.components
        mean = self._means
        if self.channel_weights is not None:
            mean = mean * self.channel_weights
        out = torch.stack([mahalanobis(x, mean[:, j], self._precisions[j]) for j in range(k)], 2)
        return out.masked_fill_(~self._valids[:, None, :], float("inf"))

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        if self._stale:
            self.finalize()
        x = patches_first(self.weighted(emb))
        d = self._component_distances(x).min(2).values  # (P, B)
        return d.T.reshape(emb.shape[0], *self.grid).contiguous()

    def copy(self) -> KMeansPadimModel:
        clone = KMeansPadimModel(self.grid, self.n_channels, **self.params())
        clone.stats = None if self.stats is None else self.stats.copy()
        clone._pending = [(e.clone(), None if m is None else m.clone()) for e, m in self._pending]
        for name in ("_means", "_precisions", "_valids", "_dirty"):
            v = getattr(self, name)
            setattr(clone, name, None if v is None else v.clone())
        clone.set_channel_weights(None if self.channel_weights is None else self.channel_weights.clone())
        return clone

    def tensors(self) -> dict[str, torch.Tensor]:
        """Per-component statistics; stored OK embeddings are clustered first (finalize)."""
        if self.stats is None:
            self.finalize()
        assert self.stats is not None
        return {"count": self.stats.count, "mean": self.stats.mean, "scatter": self.stats.scatter}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stats = GaussianStats(*(tensors[k].to(torch.float64).clone() for k in ("count", "mean", "scatter")))
        self._pending = []
        self._precisions = self._means = self._valids = self._dirty = None

    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        r, c = self.n_patches * self.components, self.n_channels
        return {"count": (r,), "mean": (r, c), "scatter": (r, c, c)}
