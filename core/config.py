"""The settings that define a detector before it sees data (a recipe's settings), and their checks.

Kept apart from :mod:`core.detector` so that reading them needs no PyTorch: the model classes
(which do) are imported only when a :class:`DetectorConfig` is built, to check the model's
own parameters; inspection from an exported graph (:mod:`core.lean_inspection`) checks a
model file's settings with :func:`check_config_types` and :func:`check_range` alone.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .anomaly_map import PostProcess
from .backbone_spec import DEFAULT_BACKBONE, BackboneSpec
from .model_file import is_number, require


def model_class(kind: str):
    """The model class by name (imports the models, and PyTorch with them)."""
    from .models import model_class as lookup

    return lookup(kind)


def model_default(cls: type, name: str) -> Any:
    """The default of model class ``cls``'s parameter ``name`` (what a recipe without it gets)."""
    return inspect.signature(cls.__init__).parameters[name].default


def _check_param_type(model: str, key: str, value: Any, default: Any) -> None:
    """Refuse a model parameter whose type does not match its default's (``--param
    rank=1.5``), by name, here rather than deep inside the model when it is built."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "text"
    else:  # None default: a list or other structure the model checks itself
        ok, want = True, ""
    if not ok:
        raise ValueError(f"model {model!r} parameter {key} must be {want}, got {value!r}")


#: the command-line option of each setting, for messages
_OPTION = {
    "image_size": "--image-size", "n_channels": "--channels", "seed": "--seed", "sigma": "--sigma",
    "pooling": "--pooling", "topk": "--topk", "batch_size": "--batch-size", "stages": "--stages",
    "false_alarm_rate": "--false-alarm-rate", "calibration_fraction": "calibration fraction",
    "tile": "--tile", "tile_overlap": "--overlap", "contrast": "--contrast",
}
#: largest seed (numpy and torch generators both take it)
MAX_SEED = 2**32 - 1
#: a Gaussian blur wider than this (pixels) only erases the map (and takes minutes: kernel 8*sigma)
MAX_SIGMA = 64.0
MAX_BATCH_SIZE = 1024
MAX_CALIBRATION_FRACTION = 0.5  # the fit set keeps the majority
MAX_FALSE_ALARM_RATE = 0.5
#: the grey-level rules of ``contrast`` (None: as recorded)
CONTRASTS = (None, "stretch", "flatten")


def _name(key: str) -> str:
    opt = _OPTION.get(key)
    return f"{key} ({opt})" if opt and opt.startswith("--") else key


def check_range(name: str, value: Any, lo: float, hi: float, integer: bool = False, unit: str = "") -> None:
    """Refuse ``value`` unless it is a finite number (a whole one if ``integer``) in
    ``[lo, hi]``; the message names the setting and the range."""
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
    if not ok:
        what = "a whole number" if integer else "a number"
        raise ValueError(f"{name} must be {what} from {lo:g} to {hi:g}{unit}, got {value!r}")


def _check_model_params(model: str, cls: type, params: dict[str, Any], n_channels: int | None) -> None:
    """Ranges each model declares (``param_ranges``: name -> (lo, hi, integer)), finiteness
    of every number, and odd-only ``neighbourhood``."""
    ranges = getattr(cls, "param_ranges", {})
    for key, value in params.items():
        label = f"model {model!r} parameter {key}"
        if key in ranges:
            lo, hi, integer = ranges[key]
            if isinstance(value, list):
                for v in value:
                    check_range(label, v, lo, hi, integer)
            else:
                check_range(label, value, lo, hi, integer)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, got {value!r}")
        elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ValueError(f"{label} must hold finite numbers, got {value!r}")
    if "neighbourhood" in params and int(params["neighbourhood"]) % 2 == 0:
        raise ValueError(f"model {model!r} parameter neighbourhood must be odd, got {params['neighbourhood']}")
    check = getattr(cls, "check_channels", None)
    if check is not None and n_channels is not None:
        check(params, n_channels)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a detector before it sees data (the recipe's settings)."""

    model: str = "padim"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    stages: tuple[int, ...] = (2, 3)
    image_size: int = 224
    n_channels: int | None = 100
    seed: int = 0
    model_params: dict[str, Any] = field(default_factory=dict)
    sigma: float = 4.0
    pooling: str = "max"
    topk: int = 100
    #: images per backbone pass; 8 is as fast as 16 on CPU and halves the transient activation
    #: memory (~200 MB less peak RSS in a fit at 224 px, benchmarks/bench_engine.py)
    batch_size: int = 8
    #: share of the OK images held out to calibrate the thresholds (added to the model after)
    calibration_fraction: float = 0.2
    false_alarm_rate: float = 0.01
    #: how 16-bit images become 8-bit: None = each image's own range, 8/10/12/14/16 = that
    #: fixed depth (see core.imageio; a fixed depth keeps absolute brightness)
    bit_depth: int | None = None
    #: high-resolution tiling (see :mod:`core.tiling`): None = the whole image scaled to
    #: ``image_size``; N = N x N pixel tiles of the original image, each seen at ``image_size``;
    #: ``"auto"`` = decided from the first OK image's size at the fit. A fitted model records
    #: the resolved tile and overlap, so it is always scored the way it was fitted.
    tile: int | str | None = None
    #: least overlap of neighbouring tiles (pixels); None = an eighth of the tile
    tile_overlap: int | None = None
    #: grey levels before the network: None = as recorded; "stretch" = each image's 1st..99th
    #: percentile stretched to the full range; "flatten" = its shading (brightness changing
    #: slowly across the part) subtracted first, then stretched (core.imageio.network_input).
    #: Parts whose exposure or lighting varies (README, Which model)
    contrast: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        cls = model_class(self.model)  # validates the name
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "grid", "n_channels"}
        unknown = set(self.model_params) - accepted
        if unknown:
            raise ValueError(f"model {self.model!r} has no parameter {', '.join(sorted(unknown))}; "
                             f"it takes {', '.join(sorted(accepted)) or 'none'}")
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
        for key, value in self.model_params.items():
            _check_param_type(self.model, key, value, defaults[key])
        self.validate()
        _check_model_params(self.model, cls, self.model_params, self.n_channels)
        self.backbone_spec()
        self.postprocess()

    def validate(self) -> None:
        """Every setting in a sane range, up front (CLI, GUI and model files alike): a value
        that would crash or run for minutes after the fit is refused before it, by name.
        Checks that need the backbone or the data (channels available, images per model
        component) run when the fit starts (:meth:`Detector.create`, :func:`core.jobs.fit_job`)."""
        from .anomaly_map import POOLINGS

        if not isinstance(self.backbone, str) or not self.backbone.strip() or len(self.backbone) > 200:
            raise ValueError(f"backbone must be a timm model name, got {self.backbone!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ValueError(f"weights must be a file path, got {self.weights!r}")
        check_range(_name("image_size"), self.image_size, 32, 4096, integer=True, unit=" pixels")
        if self.n_channels is not None:
            check_range(_name("n_channels"), self.n_channels, 1, 100_000, integer=True)
        check_range(_name("seed"), self.seed, 0, MAX_SEED, integer=True)
        if not 1 <= len(self.stages) <= 6:
            raise ValueError(f"stages (--stages) must list 1 to 6 feature stages, got {list(self.stages)}")
        for st in self.stages:
            check_range(_name("stages"), st, 0, 9, integer=True)
        if sorted(set(self.stages)) != list(self.stages):
            raise ValueError(f"stages (--stages) must be increasing feature indices, got {list(self.stages)}")
        check_range(_name("sigma"), self.sigma, 0.0, MAX_SIGMA, unit=" pixels")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling (--pooling) must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if isinstance(self.image_size, int):
            check_range(_name("topk"), self.topk, 1, self.image_size**2, integer=True,
                        unit=f" pixels (the map has {self.image_size}x{self.image_size})")
        check_range(_name("batch_size"), self.batch_size, 1, MAX_BATCH_SIZE, integer=True)
        check_range(_name("calibration_fraction"), self.calibration_fraction, 0.0, MAX_CALIBRATION_FRACTION)
        check_range(_name("false_alarm_rate"), self.false_alarm_rate, 0.0, MAX_FALSE_ALARM_RATE)
        from .imageio import check_bit_depth
        from .tiling import check_tiling

        check_bit_depth(self.bit_depth)
        check_tiling(self.tile, self.tile_overlap, self.image_size)
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast (--contrast) must be one of {', '.join(str(c) for c in CONTRASTS[1:])} "
                             f"or none, got {self.contrast!r}")
        if self.contrast is not None and self.tile is not None:
            raise ValueError(f"contrast (--contrast) {self.contrast} works on whole images: each tile stretched on "
                             "its own would change what it shows; fit tiled models without it")
        from .models import TRAINED_KINDS

        if self.tile is not None and self.model in TRAINED_KINDS:
            raise ValueError(f"model {self.model!r} trains a network on whole images and cannot be fitted on "
                             f"tiles (tiling: {self.tile!r}): use padim for high-resolution parts, or fit whole "
                             f"images (no --tile; in the window: the tiling chooser's Whole image)")

    @property
    def tiled(self) -> bool:
        """Inspected as tiles of a fixed size (a resolved setting, as in a fitted model)."""
        return isinstance(self.tile, int)

    def resolve_tiling(self, height: int, width: int) -> DetectorConfig:
        """These settings with ``auto`` tiling and a default overlap made concrete for images
        of ``height`` x ``width`` (what a fit records; see :func:`core.tiling.resolve_tiling`)."""
        from .tiling import resolve_tiling

        tile, overlap = resolve_tiling(self.tile, self.tile_overlap, self.image_size, height, width)
        return replace(self, tile=tile, tile_overlap=overlap)

    @classmethod
    def defaults(cls) -> SimpleNamespace:
        """The default of every setting, without building a config (building one checks the
        model's parameters, which imports the models and PyTorch: the command line's help
        and ``okng score`` do without)."""
        return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(cls)
                                  if f.default is not dataclasses.MISSING})

    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(self.backbone, self.stages, self.image_size, self.weights)

    def postprocess(self) -> PostProcess:
        return PostProcess(sigma=self.sigma, pooling=self.pooling, topk=self.topk)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def for_model(cls, model: str, base: DetectorConfig | None = None, **settings: Any) -> DetectorConfig:
        """Settings for ``model`` with that model's own defaults (its channel subset, fresh
        model parameters), the rest taken from ``base`` and then ``settings``.

        Used by the CLI and the GUI alike, so ``okng fit --model padim-lowrank`` and the
        GUI's chooser build the same detector.
        """
        d = (base or cls()).to_dict()
        d.update(model=model, model_params={}, n_channels=model_class(model).default_channels)
        d.update(settings)
        return cls.from_dict(d)

    def with_(self, **changes: Any) -> DetectorConfig:
        return replace(self, **changes)


def check_config_types(cfg: dict[str, Any], path: Path) -> None:
    """Each recipe setting must have its declared type (a bool is not a number, "224" is not
    224): DetectorConfig itself does not check types, and a wrong one would load silently and
    fail later, mid-inspection."""
    for f in dataclasses.fields(DetectorConfig):
        if f.name not in cfg:
            continue
        v, ann = cfg[f.name], str(f.type).replace(" ", "")
        if v is None and ann.endswith("|None"):
            continue
        base = ann.removesuffix("|None")
        if base == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif base == "float":
            ok = is_number(v)
        elif base == "str":
            ok = isinstance(v, str)
        elif base.startswith("tuple[int"):
            ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        elif base.startswith("dict"):
            ok = isinstance(v, dict)
        else:
            ok = True
        require(ok, path, f"invalid settings in the model file: {f.name!r} has the wrong type ({type(v).__name__})")
