"""The seam every normality model implements: embed once, then fit / update / score.

A model sees only patch embeddings ``(B, C, h, w)`` float32 from the shared
:class:`~core.embedding.Embedder`; it never sees images, thresholds or files. The detector,
the feedback loop, persistence and the benchmarks talk to models only through this class,
so a new model is one new module plus one line in :mod:`core.models`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F


class NormalityModel(ABC):
    #: short name used by the CLI (``okng fit --model NAME``) and in model files
    kind: ClassVar[str]
    #: one line for ``okng models`` and the GUI's model chooser
    summary: ClassVar[str]
    #: True when :meth:`partial_fit` after :meth:`finalize` equals a refit on all data
    exact_incremental: ClassVar[bool] = True
    #: True when scoring goes through :func:`core.models.mahalanobis.mahalanobis`, whose
    #: compiled kernel the fit job loads up front (see :func:`core.jobs.fit_job`)
    uses_mahalanobis: ClassVar[bool] = False
    #: size of the random channel subset a recipe fits this model with unless the engineer
    #: sets one (None: every channel of the chosen stages). The one place for this policy:
    #: the CLI and the GUI both go through :meth:`core.detector.DetectorConfig.for_model`.
    default_channels: ClassVar[int | None] = 100

    def __init__(self, grid: tuple[int, int], n_channels: int, **params: Any) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_channels = int(n_channels)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serialisable hyper-parameters (stored in the model file)."""

    @abstractmethod
    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        """Accumulate OK embeddings (B, C, h, w); ``patch_mask`` (B, h, w) bool limits which
        patches count (a marked false-alarm region). Cheap; call :meth:`finalize` after."""

    @abstractmethod
    def finalize(self) -> None:
        """Derive what scoring needs from the accumulated data."""

    @abstractmethod
    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32 -> (B, h, w) float32 patch anomaly distances (>= 0)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the model (fitted state included), by name."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`; shapes are checked by the caller against
        :meth:`expected_shapes` before this is called."""

    @abstractmethod
    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """The shape each stored tensor must have, given this model's grid and channels."""

    @property
    @abstractmethod
    def n_samples(self) -> int:
        """How many OK images (or image equivalents) the model has seen."""

    #: accepted parameter ranges: name -> (lo, hi, whole number), checked by DetectorConfig
    param_ranges: ClassVar[dict[str, tuple[float, float, bool]]] = {}

    def check_fit_size(self, n_images: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """Refuse (ValueError) parameters that are degenerate for ``n_images`` OK images;
        called when a fit starts."""

    def gaussian_view(self, patch_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The Gaussian behind the distance at the given flat patch positions (K,), for
        explaining a distance channel by channel (feedback reweighting): ``(mean (K, C),
        packed precision (K, C (C + 1) / 2))`` float32, without channel weights, in the
        embedding's channels. ``None`` for models without one such Gaussian per patch
        (memory banks, mixtures, projected or fused models): callers fall back to Euclidean."""
        return None

    def derived_tensors(self) -> dict[str, torch.Tensor] | None:
        """What :meth:`finalize` derived and scoring reads, for the derived-state cache beside
        the model file (:mod:`core.derived_cache`); None: nothing worth caching (the default)."""
        return None

    def load_derived(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Take cached :meth:`derived_tensors` instead of calling :meth:`finalize`; False (and
        the model unchanged) when they do not fit this model."""
        return False

    # Per-channel weights are shared by all models (feedback loop, issue 4).
    channel_weights: torch.Tensor | None = None
    #: False for models whose :meth:`set_channel_weights` refuses weights (trained models)
    supports_channel_weights: ClassVar[bool] = True

    def set_channel_weights(self, weights: torch.Tensor | None) -> None:
        if weights is not None:
            weights = weights.to(torch.float32).reshape(self.n_channels)
        self.channel_weights = weights

    def weighted(self, emb: torch.Tensor) -> torch.Tensor:
        if self.channel_weights is None:
            return emb
        return emb * self.channel_weights.view(1, -1, 1, 1)

    def copy(self) -> NormalityModel:
        clone = type(self)(self.grid, self.n_channels, **self.params())
        clone.load_tensors({k: v.clone() for k, v in self.tensors().items()})
        clone.set_channel_weights(None if self.channel_weights is None else self.channel_weights.clone())
        return clone


def patches_first(emb: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (h*w, B, C), the layout batched per-patch algebra wants."""
    b, c, h, w = emb.shape
    return emb.permute(2, 3, 0, 1).reshape(h * w, b, c)


def local_features(emb: torch.Tensor, size: int = 3) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h, w): mean over each patch's size x size neighbourhood
    (border patches average only the neighbours that exist). PatchCore's locally aware
    features; PaDiM's ``neighbourhood`` too."""
    if size <= 1:
        return emb
    return F.avg_pool2d(emb, size, stride=1, padding=size // 2, count_include_pad=False)
