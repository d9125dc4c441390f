"""Registry of normality models, by the name the CLI, GUI and model files use."""
from __future__ import annotations

from .base import NormalityModel
from .padim import PadimModel

MODELS: dict[str, type[NormalityModel]] = {cls.kind: cls for cls in (PadimModel,)}


def model_class(kind: str) -> type[NormalityModel]:
    try:
        return MODELS[kind]
    except KeyError:
        raise ValueError(f"unknown model {kind!r}; available: {', '.join(MODELS)}") from None


__all__ = ["MODELS", "NormalityModel", "PadimModel", "model_class"]
