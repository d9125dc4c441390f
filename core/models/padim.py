"""PaDiM: one multivariate Gaussian per patch position, Mahalanobis distance as the score.

Fit is streamed (:class:`GaussianStats`), so memory is constant in the number of OK images
and adding images later is exact. Scoring is one pass over all patch positions
(:mod:`.mahalanobis`): ``d^2 = (x - mu)^T P (x - mu)`` with the precision ``P`` kept in float32,
packed as its upper triangle (symmetric: half the bytes to read per image).

Reference: Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2020.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import NormalityModel, local_features, patches_first
from .gaussian import GaussianStats, precision_from_covariance
from .mahalanobis import mahalanobis, pack_symmetric, packed_size, padim_distances


_FINALIZE_CHUNK = 128


class PadimModel(NormalityModel):
    kind = "padim"
    summary = "one Gaussian per patch position, Mahalanobis distance (PaDiM)"
    exact_incremental = True
    uses_mahalanobis = True
    #: accepted ranges (lo, hi, whole number), checked by DetectorConfig
    param_ranges = {"epsilon": (1e-8, 1e4, False), "neighbourhood": (1, 15, True)}

    def __init__(self, grid: tuple[int, int], n_channels: int, epsilon: float = 0.01,
                 neighbourhood: int = 1) -> None:
        super().__init__(grid, n_channels)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if int(neighbourhood) < 1 or int(neighbourhood) % 2 == 0:
            raise ValueError(f"neighbourhood must be an odd number >= 1, got {neighbourhood}")
        self.epsilon = float(epsilon)
        #: each patch's features averaged over its n x n neighbourhood before the Gaussian
        #: (1: the paper's PaDiM); see :meth:`features`
        self.neighbourhood = int(neighbourhood)
        self.stats = GaussianStats.empty(self.n_patches, n_channels)
        self._mean: torch.Tensor | None = None
        #: (P, C (C + 1) / 2) float32, see :func:`.mahalanobis.pack_symmetric`
        self._precision: torch.Tensor | None = None
        #: patches whose statistics changed since the last finalize (None: all of them)
        self._dirty: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "neighbourhood": self.neighbourhood}

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """What the Gaussians describe: the embedding, each patch averaged over its
        ``neighbourhood`` (PatchCore's locally aware features). On good parts that vary
        (poly-crystalline cells) one Gaussian per position then describes the part's
        structure rather than grain-scale texture: image AUROC 0.901 -> 0.916 with 200 OK
        cells, 0.917 -> 0.932 with 600 (mono cells 0.944 -> 0.950; five random splits,
        ``benchmarks/bench_varied.py --random 5``; README, "Varied good parts, what was tried")."""
        return emb if self.neighbourhood <= 1 else local_features(emb.to(torch.float32), self.neighbourhood)

    def weighted(self, emb: torch.Tensor) -> torch.Tensor:
        """Channel weights applied to :meth:`features` (weights and the mean commute)."""
        return super().weighted(self.features(emb))

    @property
    def n_samples(self) -> int:
        return int(self.stats.count.max().item()) if self.stats.count.numel() else 0

    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        weight = None if patch_mask is None else patches_first(patch_mask[:, None].float())[..., 0]
        self.stats.update(patches_first(self.features(emb)), weight)
        if self._precision is not None and weight is not None:
            touched = weight.sum(1) > 0
            self._dirty = touched if self._dirty is None else self._dirty | touched
        else:
            self._dirty = None  # everything changed

    def finalize(self) -> None:
        """Derive mean and precision; after a masked update only the touched patches are
        recomputed, so a feedback click costs milliseconds, not a full Cholesky pass."""
        if float(self.stats.count.min()) < 1:
            raise ValueError("every patch needs at least one OK sample before scoring")
        if self._precision is not None and self._mean is not None and self._dirty is not None:
            rows = torch.nonzero(self._dirty).flatten()
            if rows.numel():
                cov = self.stats.covariance(self.epsilon, rows)
                self._precision[rows] = pack_symmetric(precision_from_covariance(cov)).to(torch.float32)
                self._mean[rows] = self.stats.mean[rows].to(torch.float32)
        else:
            # In chunks of patches: the float64 covariance, factor and inverse of all patches
            # at once would add ~200 MB to the fit's peak memory at 100 channels.
            self._precision = torch.empty(self.n_patches, packed_size(self.n_channels))
            for lo in range(0, self.n_patches, _FINALIZE_CHUNK):
                rows = torch.arange(lo, min(lo + _FINALIZE_CHUNK, self.n_patches))
                prec = precision_from_covariance(self.stats.covariance(self.epsilon, rows))
                self._precision[rows] = pack_symmetric(prec).float()
            self._mean = self.stats.mean.to(torch.float32).contiguous()
        self._dirty = torch.zeros(self.n_patches, dtype=torch.bool)

    def copy(self) -> PadimModel:
        clone = PadimModel(self.grid, self.n_channels, self.epsilon, self.neighbourhood)
        clone.stats = self.stats.copy()
        clone._mean = None if self._mean is None else self._mean.clone()
        clone._precision = None if self._precision is None else self._precision.clone()
        clone._dirty = None if self._dirty is None else self._dirty.clone()
        clone.set_channel_weights(None if self.channel_weights is None else self.channel_weights.clone())
        return clone

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        if self._precision is None or self._mean is None:
            self.finalize()
        assert self._precision is not None and self._mean is not None
        w = self.channel_weights
        emb = self.features(emb)
        if emb.dtype == torch.float32 and emb.device.type == "cpu" and not emb.requires_grad:
            d = padim_distances(emb.numpy(), self._mean.numpy(), self._precision.numpy(),
                                None if w is None else w.numpy())
            if d is not None:  # the compiled loop, no torch operation on the way
                return torch.from_numpy(d)
        x = patches_first(emb.to(torch.float32))
        mean, prec = self._mean, self._precision
        if self.channel_weights is not None:
            w = self.channel_weights
            x = x * w
            mean = mean * w
        d = mahalanobis(x, mean, prec)  # (P, B)
        b = emb.shape[0]
        return d.T.reshape(b, *self.grid).contiguous()

    def gaussian_view(self, patch_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._precision is None or self._mean is None:
            self.finalize()
        assert self._precision is not None and self._mean is not None
        return self._mean[patch_idx], self._precision[patch_idx]

    def derived_tensors(self) -> dict[str, torch.Tensor] | None:
        """The float32 means and packed precisions (derived from the float64 statistics by
        :meth:`finalize`: a Cholesky solve per patch), when they are up to date."""
        if self._precision is None or self._mean is None or self._dirty is None or bool(self._dirty.any()):
            return None
        return {"mean": self._mean, "precision": self._precision}

    def load_derived(self, tensors: dict[str, torch.Tensor]) -> bool:
        mean, prec = tensors.get("mean"), tensors.get("precision")
        p, c = self.n_patches, self.n_channels
        shapes = {"mean": (p, c), "precision": (p, packed_size(c))}
        if set(tensors) != set(shapes) or float(self.stats.count.min()) < 1:
            return False
        for name, t in (("mean", mean), ("precision", prec)):
            if t.dtype != torch.float32 or tuple(t.shape) != shapes[name]:
                return False
            if not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):  # max/min propagate NaN
                return False
        self._mean, self._precision = mean.contiguous(), prec.contiguous()
        self._dirty = torch.zeros(self.n_patches, dtype=torch.bool)
        return True

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"count": self.stats.count, "mean": self.stats.mean, "scatter": self.stats.scatter}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stats = GaussianStats(
            tensors["count"].to(torch.float64),
            tensors["mean"].to(torch.float64),
            tensors["scatter"].to(torch.float64),
        )
        self._mean = self._precision = self._dirty = None

    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        p, c = self.n_patches, self.n_channels
        return {"count": (p,), "mean": (p, c), "scatter": (p, c, c)}
