"""Registry of normality models, by the name the CLI, GUI and model files use.

The model classes (and PyTorch with them) are imported on first use of :data:`MODELS`,
:func:`model_class` or a class name, not when the package is: the compiled scoring kernel
(:mod:`.mahalanobis`) is used without PyTorch by inspection from an exported graph
(:mod:`core.lean_inspection`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import NormalityModel

#: the registry's names in its order, known without importing the models (the command line's
#: choices); :func:`_registry` checks they are the classes' own
KINDS = ("padim", "patchcore", "padim-kmeans", "padim-lowrank", "padim-fusion", "riad", "favae", "kdad")
#: the models a network is trained for (:mod:`.trained`): fit with epochs, not in one pass
TRAINED_KINDS = ("riad", "favae", "kdad")

_CLASSES = {
    "NormalityModel": "base", "StageFusionModel": "fusion", "LowRankPadimModel": "lowrank",
    "KMeansPadimModel": "mixture", "PadimModel": "padim", "PatchcoreModel": "patchcore",
    "RiadModel": "riad", "FavaeModel": "favae", "KdadModel": "kdad", "TrainedModel": "trained",
}


def _registry() -> dict[str, type[NormalityModel]]:
    from .favae import FavaeModel
    from .fusion import StageFusionModel
    from .kdad import KdadModel
    from .lowrank import LowRankPadimModel
    from .mixture import KMeansPadimModel
    from .padim import PadimModel
    from .patchcore import PatchcoreModel
    from .riad import RiadModel

    registry = {cls.kind: cls
                for cls in (PadimModel, PatchcoreModel, KMeansPadimModel, LowRankPadimModel, StageFusionModel,
                            RiadModel, FavaeModel, KdadModel)}
    trained = tuple(k for k, cls in registry.items() if getattr(cls, "trains", False))
    if tuple(registry) != KINDS or trained != TRAINED_KINDS:
        raise RuntimeError(f"core.models.KINDS {KINDS} does not list the models {tuple(registry)}")
    return registry


def model_class(kind: str) -> type[NormalityModel]:
    models = globals().get("MODELS") or __getattr__("MODELS")
    try:
        return models[kind]
    except KeyError:
        raise ValueError(f"unknown model {kind!r}; available: {', '.join(models)}") from None


def __getattr__(name: str):
    if name == "MODELS":
        value = _registry()
    elif name in _CLASSES:
        import importlib

        value = getattr(importlib.import_module(f".{_CLASSES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'core.models' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "KINDS", "MODELS", "TRAINED_KINDS", "FavaeModel", "KMeansPadimModel", "KdadModel", "LowRankPadimModel",
    "NormalityModel", "PadimModel", "PatchcoreModel", "RiadModel", "StageFusionModel", "TrainedModel", "model_class",
]
