"""Model files: one ``.safetensors`` file, tensors plus a JSON description in its header.

Loading never runs code from the file (safetensors holds raw arrays; the JSON is parsed as
data and every field is type-checked). A file from another format version, with wrong
shapes, non-finite values or fields of the wrong type is refused with a clear
:class:`~core.errors.ModelFileError`. Saving is atomic: the previous file survives a crash
or a full disk.

Example:
    >>> save_detector(det, "cells.okng")
    >>> det2 = load_detector("cells.okng")      # same scores, bit for bit
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import write_atomic
from .backbone import FeatureExtractor
from .detector import Detector, DetectorConfig
from .errors import BackboneUnavailableError, ModelFileError
from .models import model_class
from .thresholds import Thresholds

log = logging.getLogger(__name__)

FORMAT = "okng-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".okng"


def _metadata(det: Detector) -> dict[str, Any]:
    th = det.thresholds
    ex = det.extractor
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "okng_version": __version__,
        "config": det.config.to_dict(),
        "backbone": {
            "weights": ex.weights_identity,
            "stage_channels": list(ex.stage_channels),
            "norm_mean": list(ex.norm_mean),
            "norm_std": list(ex.norm_std),
        },
        "model": {
            "kind": det.model.kind,
            "params": det.model.params(),
            "grid": list(det.model.grid),
            "n_channels": det.model.n_channels,
        },
        "thresholds": None if th is None else {
            "image": th.image, "pixel": th.pixel, "target_false_alarm_rate": th.target_false_alarm_rate,
        },
    }


def detector_tensors(det: Detector) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in det.model.tensors().items()}
    t["embedding.channel_idx"] = torch.from_numpy(det.embedder.channel_idx)
    if det.model.channel_weights is not None:
        t["model_weights.channels"] = det.model.channel_weights
    if det.thresholds is not None:
        t["thresholds.calibration_scores"] = torch.from_numpy(np.asarray(det.thresholds.calibration_scores, np.float64))
        t["thresholds.calibration_peaks"] = torch.from_numpy(np.asarray(det.thresholds.calibration_peaks, np.float64))
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}


def save_detector(det: Detector, path: str | os.PathLike[str]) -> Path:
    """Write the detector atomically; returns the path written."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"okng": json.dumps(_metadata(det))}
    tensors = detector_tensors(det)
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def read_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse a model file into (metadata, tensors) without trusting anything in it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a model file"
        raise ModelFileError(f"{path} is not a readable OK/NG model file ({str(exc)[:160]})") from None
    raw = header.get("okng")
    if not isinstance(raw, str):
        raise ModelFileError(f"{path} is a safetensors file but not an OK/NG Station model")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: the model description is damaged (invalid JSON)") from None
    _check_meta(meta, path)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is damaged")
    return meta, tensors


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ModelFileError(f"{path}: {what}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_meta(meta: Any, path: Path) -> None:
    _require(isinstance(meta, dict) and meta.get("format") == FORMAT, path, "not an OK/NG Station model")
    version = meta.get("format_version")
    _require(isinstance(version, int) and not isinstance(version, bool), path, "format version missing")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer OK/NG Station (model format {version}, made by "
            f"version {meta.get('okng_version', '?')}); this station reads format {FORMAT_VERSION}. "
            "Update OK/NG Station, or refit the model here."
        )
    _require(version == FORMAT_VERSION, path, f"model format {version} is no longer supported; refit the model")
    for key in ("config", "backbone", "model"):
        _require(isinstance(meta.get(key), dict), path, f"field {key!r} is missing or not an object")
    m = meta["model"]
    _require(isinstance(m.get("kind"), str) and isinstance(m.get("params"), dict), path, "model kind/params invalid")
    _require(isinstance(m.get("grid"), list) and len(m["grid"]) == 2 and all(isinstance(g, int) and 0 < g <= 4096 for g in m["grid"]),
             path, "model grid invalid")
    _require(isinstance(m.get("n_channels"), int) and 0 < m["n_channels"] <= 100_000, path, "channel count invalid")
    th = meta.get("thresholds")
    _require(th is None or (isinstance(th, dict) and _is_number(th.get("image")) and _is_number(th.get("pixel"))
                            and _is_number(th.get("target_false_alarm_rate"))),
             path, "thresholds invalid")


def load_detector(path: str | os.PathLike[str], extractor: FeatureExtractor | None = None) -> Detector:
    """Rebuild a detector from a model file. ``extractor`` shares an already loaded backbone."""
    path = Path(path)
    meta, tensors = read_model_file(path)
    try:
        config = DetectorConfig.from_dict(dict(meta["config"]))
        cls = model_class(meta["model"]["kind"])
        model = cls(tuple(meta["model"]["grid"]), meta["model"]["n_channels"], **meta["model"]["params"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid settings in the model file ({exc})") from None
    if extractor is None or extractor.spec != config.backbone_spec():
        try:
            extractor = FeatureExtractor(config.backbone_spec())
        except BackboneUnavailableError as exc:
            raise ModelFileError(f"{path}: the model's backbone is not available here: {exc}") from None
    stored_weights = meta["backbone"].get("weights")
    if stored_weights != extractor.weights_identity:
        raise ModelFileError(
            f"{path} was fitted with backbone weights {stored_weights!r} but this station loads "
            f"{extractor.weights_identity!r}; scores would be meaningless. Refit the model."
        )
    idx = tensors.pop("embedding.channel_idx", None)
    _require(idx is not None and idx.dim() == 1 and idx.dtype == torch.int64, path, "channel indices missing")
    _require(idx.numel() == model.n_channels, path, "channel indices do not match the model")
    weights = tensors.pop("model_weights.channels", None)
    cal_scores = tensors.pop("thresholds.calibration_scores", torch.zeros(0, dtype=torch.float64))
    cal_peaks = tensors.pop("thresholds.calibration_peaks", torch.zeros(0, dtype=torch.float64))
    model_t = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.expected_shapes(model_t)
    _require(set(model_t) == set(expected), path,
             f"model tensors {sorted(model_t)} do not match {model.kind}'s {sorted(expected)}")
    for name, shape in expected.items():
        _require(tuple(model_t[name].shape) == tuple(shape), path,
                 f"tensor {name!r} has shape {tuple(model_t[name].shape)}, expected {tuple(shape)}")
    try:
        det = Detector(config, extractor, idx.numpy(), model)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    _require(tuple(det.embedder.grid_size) == tuple(model.grid), path, "model grid does not match the backbone")
    model.load_tensors(model_t)
    if weights is not None:
        _require(tuple(weights.shape) == (model.n_channels,), path, "channel weights have the wrong shape")
        model.set_channel_weights(weights)
    th = meta.get("thresholds")
    if th is not None:
        det.thresholds = Thresholds(float(th["image"]), float(th["pixel"]), cal_scores.numpy(), cal_peaks.numpy(),
                                    float(th["target_false_alarm_rate"]))
    if model.n_samples > 0:
        det.finalize()
    return det
