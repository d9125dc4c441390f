"""The detector: backbone + embedding + normality model + post-processing + thresholds.

A :class:`Detector` turns images into :class:`Inspection` results. It is the object the CLI,
the GUI controller and the benchmarks hold; long work that builds or uses one lives in
:mod:`core.jobs` as cancellable generators.

Example:
    >>> det = Detector.create(DetectorConfig())          # loads the backbone (seconds)
    >>> det.fit_embeddings(det.embed(images))            # OK images, batch by batch
    >>> det.finalize()
    >>> result = det.inspect([load_image("part.png")])[0]
    >>> result.score, result.verdict
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np
import torch

from .anomaly_map import PostProcess
from .backbone import DEFAULT_BACKBONE, BackboneInfo, BackboneSpec, FeatureExtractor
from .embedding import Embedder, choose_channels
from .errors import BackboneUnavailableError, NotFittedError, OkngError
from .models import NormalityModel, model_class
from .thresholds import Thresholds, verdict

log = logging.getLogger(__name__)


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
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ValueError("calibration fraction must be in [0, 1)")
        if not 0.0 <= self.false_alarm_rate < 1.0:
            raise ValueError("false-alarm rate must be in [0, 1)")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        self.backbone_spec()
        self.postprocess()

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


@dataclass(frozen=True)
class Inspection:
    """The result of inspecting one image. Arrays are read-only snapshots."""

    score: float
    verdict: str  # "OK" | "NG" | "?" (no threshold yet)
    anomaly_map: np.ndarray  # (S, S) float32, network input resolution
    image_threshold: float | None
    pixel_threshold: float | None

    @property
    def peak(self) -> float:
        return float(self.anomaly_map.max())


def preprocess(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 images of any size -> (B, 3, size, size) float32 in [0, 1]."""
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        interp = cv2.INTER_AREA if min(img.shape[:2]) >= size else cv2.INTER_LINEAR
        batch[i] = cv2.resize(img, (size, size), interpolation=interp)
    t = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    return t.contiguous()


class Detector:
    def __init__(
        self,
        config: DetectorConfig,
        extractor: FeatureExtractor | BackboneInfo,
        channel_idx: np.ndarray,
        model: NormalityModel,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.config = config
        self.extractor = extractor
        self.embedder = Embedder(extractor, channel_idx)
        self.model = model
        self.post = config.postprocess()
        self.thresholds = thresholds
        #: (N, C, h, w) float16 embeddings of the held-out OK calibration images. Kept so
        #: that every model change (feedback, reweighting) can be recalibrated on truly
        #: unseen OK images in milliseconds, without re-reading them.
        self.calibration_embeddings: torch.Tensor | None = None
        #: ids of the stored operator labels this model has learnt, in order (see
        #: :mod:`core.session_labels`); saved in the model file
        self.applied_labels: tuple[int, ...] = ()
        #: the model file this detector was loaded from or saved to (its embedding graph is
        #: cached beside it), or None
        self.model_path: str | None = None
        #: what runs the embedding at inspection (see :meth:`use_runtime`); None: PyTorch
        self._runtime = None
        #: why the requested runtime is not the one running (one line per runtime skipped)
        self.runtime_notes: list[str] = []

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, config: DetectorConfig, extractor: FeatureExtractor | None = None) -> Detector:
        """An unfitted detector. Pass ``extractor`` to share an already loaded backbone."""
        if not isinstance(extractor, FeatureExtractor) or extractor.spec != config.backbone_spec():
            extractor = FeatureExtractor(config.backbone_spec())
        idx = choose_channels(sum(extractor.stage_channels), config.n_channels, config.seed)
        probe = Embedder(extractor, idx)
        cls_, params = model_class(config.model), dict(config.model_params)
        if getattr(cls_, "needs_channel_stage", False) and "channel_stage" not in params:
            params["channel_stage"] = probe.channel_stage.tolist()  # stage of each channel
        if getattr(cls_, "needs_stage_strides", False) and "stage_strides" not in params:
            strides = extractor.stage_strides
            params["stage_strides"] = [s // strides[0] for s in strides]  # relative to the finest
        model = cls_(probe.grid_size, probe.n_channels, **params)
        return cls(config, extractor, idx, model)

    def copy(self) -> Detector:
        """An independent snapshot (shares only the read-only backbone)."""
        th = None if self.thresholds is None else replace(self.thresholds)
        det = Detector(self.config, self.extractor, self.embedder.channel_idx.copy(), self.model.copy(), th)
        det.calibration_embeddings = self.calibration_embeddings  # never modified in place
        det.applied_labels = self.applied_labels
        det.model_path, det._runtime, det.runtime_notes = self.model_path, self._runtime, list(self.runtime_notes)
        return det

    # -- data flow ----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.image_size

    def warm_up(self) -> None:
        """Load the compiled scoring kernel now (from numba's cache: ~1 s; first compile ~3 s)
        instead of inside the first inspection. Models that do not use it: no-op."""
        if self.model.uses_mahalanobis:
            from .models.mahalanobis import warm_up

            warm_up()

    # -- the embedding runtime ------------------------------------------------------------
    @property
    def runtime_name(self) -> str:
        """What runs the embedding: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``."""
        return "torch" if self._runtime is None else self._runtime.name

    def use_runtime(self, runtime: str | None = None, model_path: str | os.PathLike[str] | None = None) -> str:
        """Run the embedding with ``runtime`` (``auto``/None: the fastest that works here, see
        :mod:`core.runtime`) from now on; returns the name of the one chosen.

        Exports the embedding graph the first time (seconds; then cached beside the model
        file). Never fails for an unavailable runtime: it falls back to torch and says why in
        :attr:`runtime_notes` and the log. Fitting always embeds with PyTorch.
        """
        from .runtime import select_runtime

        if not self.embedder.has_backbone:
            try:
                self.attach_backbone()
            except OkngError as exc:  # a bundle on a PC without timm: keep what runs
                self.runtime_notes = [f"cannot change the runtime: {exc}"]
                log.warning("embedding runtime unchanged: %s", exc)
                return self.runtime_name
        if model_path is not None:
            self.model_path = str(model_path)
        sel = select_runtime(self.embedder, runtime, self.model_path)
        self._runtime = None if sel.name == "torch" else sel.runtime
        self.runtime_notes = sel.notes
        return self.runtime_name

    def attach_backbone(self) -> None:
        """Load the PyTorch backbone of a detector built without it (an exported bundle, or a
        model loaded for inspection from its cached graph); raises if it cannot be had here."""
        if self.embedder.has_backbone:
            return
        info = self.extractor
        ex = FeatureExtractor(self.config.backbone_spec())
        if ex.weights_identity != info.weights_identity:
            raise BackboneUnavailableError(f"this station loads backbone weights {ex.weights_identity!r}, the "
                                           f"model was fitted with {info.weights_identity!r}")
        self.extractor = ex
        self.embedder = Embedder(ex, self.embedder.channel_idx)

    def set_runtime(self, runtime) -> None:
        """Use an already opened runtime (an exported bundle's); None: PyTorch."""
        self._runtime = runtime

    def embed(self, images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """RGB uint8 images (or a preprocessed batch) -> (B, C, h, w) float32 embeddings.

        Runs on the runtime chosen by :meth:`use_runtime` (PyTorch until then); the result is
        the same whichever runs it (to ~1e-6 of its range)."""
        batch = images if isinstance(images, torch.Tensor) else preprocess(images, self.image_size)
        rt = self._runtime
        if rt is not None:
            try:
                return rt(batch)
            except Exception as exc:  # noqa: BLE001 - the reference takes over, if it is here
                if not self.embedder.has_backbone:
                    try:
                        self.attach_backbone()
                    except OkngError:
                        raise exc from None
                note = f"{rt.name} failed ({exc.__class__.__name__}: {str(exc)[:160]}); using torch"
                log.warning("embedding runtime %s", note)
                self.runtime_notes.append(note)
                self._runtime = None
        return self.embedder(batch)

    def embed_torch(self, images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """:meth:`embed` with PyTorch whatever the runtime (fitting, reference checks)."""
        batch = images if isinstance(images, torch.Tensor) else preprocess(images, self.image_size)
        return self.embedder(batch)

    def fit_embeddings(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        self.model.partial_fit(emb, patch_mask)

    def finalize(self) -> None:
        if self.model.n_samples < 1:
            raise NotFittedError("no OK images were fitted: add OK images and fit first")
        self.model.finalize()

    def maps_and_scores(self, emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, h, w) -> ((B, S, S) float32 maps, (B,) float64 image scores)."""
        if self.model.n_samples < 1:
            raise NotFittedError("the model is not fitted yet: fit it on OK images first")
        with torch.inference_mode():
            dist = self.model.score(emb)
        maps = self.post.maps(dist, self.image_size)
        pixel = self.thresholds.pixel if self.thresholds else None
        return maps, self.post.scores(maps, pixel)

    def judge(self, score: float, anomaly_map: np.ndarray) -> Inspection:
        anomaly_map.flags.writeable = False
        th = self.thresholds
        v = verdict(score, th.image) if th else "?"
        return Inspection(float(score), v, anomaly_map, th.image if th else None, th.pixel if th else None)

    def inspect_embeddings(self, emb: torch.Tensor) -> list[Inspection]:
        maps, scores = self.maps_and_scores(emb)
        return [self.judge(s, m) for s, m in zip(scores, maps)]

    def inspect(self, images: list[np.ndarray]) -> list[Inspection]:
        """Score RGB uint8 images (any size) and judge them against the thresholds."""
        return self.inspect_embeddings(self.embed(images))

    def calibrate_on(self, held_out: torch.Tensor, false_alarm_rate: float | None = None) -> None:
        """Set the thresholds from held-out OK embeddings (N, C, h, w) and keep them."""
        self.calibration_embeddings = held_out.to(torch.float16)
        self.recalibrate(false_alarm_rate)

    def calibration_scores(self, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(image scores, map peaks) of the held-out OK images under the current model."""
        held = self.calibration_embeddings
        if held is None or held.shape[0] == 0:
            return np.zeros(0), np.zeros(0)
        scores, peaks = [], []
        for i in range(0, held.shape[0], chunk):
            maps, s = self.maps_and_scores(held[i : i + chunk].to(torch.float32))
            scores.append(s)
            peaks.append(maps.reshape(len(maps), -1).max(axis=1))
        return np.concatenate(scores), np.concatenate(peaks)

    def recalibrate(self, false_alarm_rate: float | None = None) -> None:
        """Re-derive both thresholds at the target false-alarm rate for the current model.

        Blob pooling needs a pixel level to score, so it is calibrated in two passes.
        """
        from .thresholds import calibrate

        if self.calibration_embeddings is None or self.calibration_embeddings.shape[0] == 0:
            return
        far = false_alarm_rate if false_alarm_rate is not None else (
            self.thresholds.target_false_alarm_rate if self.thresholds else self.config.false_alarm_rate)
        for _ in range(2 if self.config.pooling == "blob" else 1):
            self.thresholds = calibrate(*self.calibration_scores(), far)

    def refresh_calibration(self) -> None:
        """Keep the thresholds; re-score the held-out OK images so the expected false-alarm
        rate shown for them is true for the current model (after feedback)."""
        if self.thresholds is None or self.calibration_embeddings is None:
            return
        scores, peaks = self.calibration_scores()
        self.thresholds = replace(self.thresholds, calibration_scores=scores, calibration_peaks=peaks)

    # -- description --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        ex = self.extractor
        return {
            "model": self.config.model,
            "backbone": ex.spec.name,
            "weights": ex.weights_identity,
            "stages": list(ex.spec.stages),
            "stage_channels": list(ex.stage_channels),
            "channels": self.embedder.n_channels,
            "grid": list(self.embedder.grid_size),
            "image_size": self.image_size,
            "ok_images": self.model.n_samples,
            "runtime": self.runtime_name,
        }
