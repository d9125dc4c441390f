"""PaDiM on a semi-orthogonal projection of the embedding (Kim et al., 2021).

Instead of keeping a random subset of channels, every embedding ``x`` (C channels) is
projected to ``z = W^T x`` with a fixed semi-orthogonal ``W`` (C x k): the Q factor of the
QR decomposition of a seeded Gaussian matrix. One Gaussian per patch is then fitted to
``z`` exactly as in PaDiM (streamed :class:`~core.models.gaussian.GaussianStats`, so adding
images later equals a refit). The model costs ``k x k`` per patch whatever the backbone, so
use it with ``n_channels=None`` (all channels) on a wide backbone. ``k = rank`` (default
100); when ``k >= C`` W is the identity and the model is plain PaDiM. W is stored in the
model file, so scores never depend on a machine's QR implementation.

Channel weights (feedback loop) act on ``x`` before the projection; the per-patch mean of
``x`` is kept too, so the weighted difference ``W^T (w * (x - mean_x))`` is used, as PaDiM
weights ``x - mean``.

Reference: Kim et al., "Semi-orthogonal Embedding for Efficient Unsupervised Anomaly
Segmentation", arXiv:2105.14737, 2021.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import NormalityModel, patches_first
from .mahalanobis import mahalanobis
from .padim import PadimModel


def semi_orthogonal(n_channels: int, rank: int, seed: int) -> torch.Tensor:
    """(C, k) float32 with orthonormal columns, seeded; the identity when k >= C."""
    if rank >= n_channels:
        return torch.eye(n_channels, dtype=torch.float32)
    g = np.random.default_rng(seed).standard_normal((n_channels, rank))
    q, _ = np.linalg.qr(g)
    return torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))


class LowRankPadimModel(NormalityModel):
    kind = "padim-lowrank"
    summary = "PaDiM on a semi-orthogonal projection to `rank` dims (Kim et al.); for wide backbones"
    #: the semi-orthogonal projection replaces the random subset: it sees every channel
    default_channels = None
    exact_incremental = True
    uses_mahalanobis = True
    #: accepted ranges (lo, hi, whole number), checked by DetectorConfig
    param_ranges = {"rank": (1, 4096, True), "epsilon": (1e-8, 1e4, False), "seed": (0, 2**32 - 1, True)}

    @staticmethod
    def check_channels(params: dict[str, Any], n_channels: int) -> None:
        """An explicit rank above the channel count is plain PaDiM under another name: refused.
        (The default rank on fewer channels keeps them all, as documented.)"""
        rank = params.get("rank")
        if rank is not None and rank > n_channels:
            raise ValueError(f"model 'padim-lowrank' parameter rank must be from 1 to the number of "
                             f"channels ({n_channels}), got {rank}")

    def __init__(self, grid: tuple[int, int], n_channels: int, rank: int = 100,
                 epsilon: float = 0.01, seed: int = 0) -> None:
        super().__init__(grid, n_channels)
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.seed = int(seed)
        self.k = min(self.rank, self.n_channels)
        self.projection = semi_orthogonal(self.n_channels, self.rank, self.seed)
        self.inner = PadimModel(grid, self.k, epsilon)
        self.epsilon = self.inner.epsilon
        self.mean_x = torch.zeros(self.n_patches, self.n_channels, dtype=torch.float64)

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank, "epsilon": self.epsilon, "seed": self.seed}

    @property
    def n_samples(self) -> int:
        return self.inner.n_samples

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, k, h, w)."""
        return torch.einsum("bchw,ck->bkhw", emb.to(torch.float32), self.projection).contiguous()

    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        x = patches_first(emb.to(torch.float64))  # (P, B, C)
        if patch_mask is None:
            w = torch.ones(x.shape[:2], dtype=torch.float64)
        else:
            w = patches_first(patch_mask[:, None].to(torch.float64))[..., 0]
        n_a = self.inner.stats.count
        n = n_a + w.sum(1)
        self.mean_x += ((x * w[..., None]).sum(1) - w.sum(1)[:, None] * self.mean_x) / n.clamp_min(1.0)[:, None]
        self.inner.partial_fit(self.project(emb), patch_mask)

    def finalize(self) -> None:
        self.inner.finalize()

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        if self.channel_weights is None:
            return self.inner.score(self.project(emb))
        if self.inner._precision is None:
            self.inner.finalize()
        w = self.channel_weights
        z = patches_first(self.project(emb * w.view(1, -1, 1, 1)))  # (P, B, k)
        mean_z = (self.mean_x.to(torch.float32) * w) @ self.projection  # (P, k)
        d = mahalanobis(z, mean_z, self.inner._precision)
        return d.T.reshape(emb.shape[0], *self.grid).contiguous()

    def copy(self) -> LowRankPadimModel:
        clone = LowRankPadimModel(self.grid, self.n_channels, **self.params())
        clone.load_tensors({k: v.clone() for k, v in self.tensors().items()})
        clone.inner = self.inner.copy()
        clone.set_channel_weights(None if self.channel_weights is None else self.channel_weights.clone())
        return clone

    def tensors(self) -> dict[str, torch.Tensor]:
        t = self.inner.tensors()
        t["projection"] = self.projection
        t["mean_x"] = self.mean_x
        return t

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.projection = tensors["projection"].to(torch.float32).contiguous()
        self.mean_x = tensors["mean_x"].to(torch.float64).clone()
        self.inner.load_tensors({k: tensors[k] for k in ("count", "mean", "scatter")})

    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        shapes = self.inner.expected_shapes(tensors)
        shapes["projection"] = (self.n_channels, self.k)
        shapes["mean_x"] = (self.n_patches, self.n_channels)
        return shapes
