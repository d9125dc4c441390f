"""Registry of normality models, by the name the CLI, GUI and model files use."""
from __future__ import annotations

from .base import NormalityModel
from .fusion import StageFusionModel
from .lowrank import LowRankPadimModel
from .mixture import KMeansPadimModel
from .padim import PadimModel
from .patchcore import PatchcoreModel

MODELS: dict[str, type[NormalityModel]] = {
    cls.kind: cls
    for cls in (PadimModel, PatchcoreModel, KMeansPadimModel, LowRankPadimModel, StageFusionModel)
}


def model_class(kind: str) -> type[NormalityModel]:
    try:
        return MODELS[kind]
    except KeyError:
        raise ValueError(f"unknown model {kind!r}; available: {', '.join(MODELS)}") from None


__all__ = [
    "MODELS", "KMeansPadimModel", "LowRankPadimModel", "NormalityModel", "PadimModel", "PatchcoreModel",
    "StageFusionModel", "model_class",
]
