"""PaDiM: one multivariate Gaussian per patch position, Mahalanobis distance as the score.

Fit is streamed (:class:`GaussianStats`), so memory is constant in the number of OK images
and adding images later is exact. Scoring is one batched matrix product over all patch
positions: ``d^2 = (x - mu)^T P (x - mu)`` with the precision ``P`` kept in float32.

Reference: Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2020.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import NormalityModel, patches_first
from .gaussian import GaussianStats, precision_from_covariance


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Batched Mahalanobis distance. x (P, B, C), mean (P, C), precision (P, C, C) -> (P, B)."""
    diff = x - mean[:, None, :]
    d2 = (torch.bmm(diff, precision) * diff).sum(-1)
    return d2.clamp_min_(0.0).sqrt_()


class PadimModel(NormalityModel):
    kind = "padim"
    summary = "one Gaussian per patch position, Mahalanobis distance (PaDiM)"
    exact_incremental = True

    def __init__(self, grid: tuple[int, int], n_channels: int, epsilon: float = 0.01) -> None:
        super().__init__(grid, n_channels)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.stats = GaussianStats.empty(self.n_patches, n_channels)
        self._mean: torch.Tensor | None = None
        self._precision: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    @property
    def n_samples(self) -> int:
        return int(self.stats.count.max().item()) if self.stats.count.numel() else 0

    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        weight = None if patch_mask is None else patches_first(patch_mask[:, None].float())[..., 0]
        self.stats.update(patches_first(emb), weight)

    def finalize(self) -> None:
        if float(self.stats.count.min()) < 1:
            raise ValueError("every patch needs at least one OK sample before scoring")
        cov = self.stats.covariance(self.epsilon)
        self._precision = precision_from_covariance(cov).to(torch.float32).contiguous()
        self._mean = self.stats.mean.to(torch.float32).contiguous()

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        if self._precision is None or self._mean is None:
            self.finalize()
        assert self._precision is not None and self._mean is not None
        x = patches_first(emb.to(torch.float32))
        mean, prec = self._mean, self._precision
        if self.channel_weights is not None:
            w = self.channel_weights
            x = x * w
            mean = mean * w
        d = mahalanobis(x, mean, prec)  # (P, B)
        b = emb.shape[0]
        return d.T.reshape(b, *self.grid).contiguous()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"count": self.stats.count, "mean": self.stats.mean, "scatter": self.stats.scatter}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stats = GaussianStats(
            tensors["count"].to(torch.float64),
            tensors["mean"].to(torch.float64),
            tensors["scatter"].to(torch.float64),
        )
        self._mean = self._precision = None

    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        p, c = self.n_patches, self.n_channels
        return {"count": (p,), "mean": (p, c), "scatter": (p, c, c)}
