"""Model files: one ``.safetensors`` file, tensors plus a JSON description in its header.

Loading never runs code from the file (safetensors holds raw arrays; the JSON is parsed as
data and every field is type-checked). A file from another format version, with wrong
shapes, non-finite values or fields of the wrong type is refused with a clear
:class:`~core.errors.ModelFileError`. Saving is atomic: the previous file survives a crash
or a full disk.

Integrity (format 2): the header carries ``okng_sha256``, the SHA-256 of the whole file
(8-byte length, header, tensor data) computed with that digest field set to 64 zeros. It is
verified before anything in the file is used, so one flipped bit anywhere (a stored
threshold, a tensor value, the header) is refused as damaged instead of silently changing
verdicts. Format 1 files (written before the checksum existed) still load, with a logged
warning that their integrity cannot be verified; saving them again adds the checksum.
A format-2 file without its checksum is refused.

Example:
    >>> save_detector(det, "cells.okng")
    >>> det2 = load_detector("cells.okng")      # same scores, bit for bit
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, derived_cache
from .atomic import write_atomic
from .backbone import BackboneInfo, FeatureExtractor
from .config import DetectorConfig, check_config_types
from .detector import Detector
from .errors import BackboneUnavailableError, ModelFileError
from .model_file import (  # noqa: F401 - the file format, re-exported where it always was
    CHECKSUM_KEY, FORMAT, FORMAT_VERSION, MODEL_SUFFIX, OLDEST_FORMAT_VERSION, READABLE_VERSIONS, is_number,
    read_checked, require, seal_model_bytes,
)
from .models import model_class
from .thresholds import Thresholds

log = logging.getLogger(__name__)

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
        "feedback": {"applied_labels": [int(i) for i in det.applied_labels]},
        "calibration_paths": list(det.calibration_paths),
        "feedback_memory": None if det.memory is None else det.memory.params(),
    }


def detector_tensors(det: Detector) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in det.model.tensors().items()}
    t["embedding.channel_idx"] = torch.from_numpy(det.embedder.channel_idx)
    if det.model.channel_weights is not None:
        t["model_weights.channels"] = det.model.channel_weights
    if det.thresholds is not None:
        t["thresholds.calibration_scores"] = torch.from_numpy(np.asarray(det.thresholds.calibration_scores, np.float64))
        t["thresholds.calibration_peaks"] = torch.from_numpy(np.asarray(det.thresholds.calibration_peaks, np.float64))
    if det.calibration_embeddings is not None:
        t["calibration.embeddings"] = det.calibration_embeddings.to(torch.float16)
    if det.memory is not None:
        t.update({f"feedback_memory.{k}": v for k, v in det.memory.tensors().items()})
    if det.feedback_evidence:
        t.update({f"feedback_evidence.{k}": v for k, v in det.feedback_evidence.items()})
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}


def save_detector(det: Detector, path: str | os.PathLike[str], cache_derived: bool = True) -> Path:
    """Write the detector atomically; returns the path written (the detector remembers it:
    its embedding graph is cached beside it). ``cache_derived`` also writes what the model
    scores with beside it (:mod:`core.derived_cache`); an exported bundle, a fixed set of
    files, does without."""
    out, digest = _write_sealed(path, detector_tensors(det), _metadata(det))
    det.model_path = str(out)
    if cache_derived and det.model.n_samples > 0:  # the precisions it scores with, for the next load
        derived_cache.store(det.model, out, digest)
    return out


def write_model_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                     meta: dict[str, Any]) -> Path:
    """Serialize tensors + description with its checksum and write it atomically.

    The bytes are written by Python, so a full disk raises ``OSError(ENOSPC)``, which
    :mod:`core.atomic` turns into one clear line (safetensors' own ``save_file`` raises its
    ``SafetensorError`` instead, not an OSError).
    """
    return _write_sealed(path, tensors, meta)[0]


def _write_sealed(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> tuple[Path, str]:
    """:func:`write_model_file`, also returning the file's SHA-256 (``okng_sha256``)."""
    from safetensors.torch import save

    path = Path(path)
    raw = save(tensors, metadata={"okng": json.dumps(meta), CHECKSUM_KEY: "0" * 64})  # sealed below
    pieces = seal_model_bytes(raw)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)

    write_atomic(path, write)
    return path, bytes(pieces[1]).decode()


def read_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse a model file into (metadata, tensors) without trusting anything in it.

    The whole file is read once; the checksum is verified on those very bytes, and the
    tensors are taken from them (no second read that could see another file).
    """
    meta, tensors, _ = _read_checked(path)
    return meta, tensors


def _read_checked(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], str | None]:
    """:func:`read_model_file`, also returning the verified SHA-256 (None: a format-1 file)."""
    meta, arrays, digest = read_checked(path, check_config_types)
    return meta, {k: torch.from_numpy(v) for k, v in arrays.items()}, digest


def load_detector(path: str | os.PathLike[str], extractor: FeatureExtractor | BackboneInfo | None = None,
                  runtime: str | None = None) -> Detector:
    """Rebuild a detector from a model file. ``extractor`` shares an already loaded backbone
    (a :class:`BackboneInfo`: no network, as in an exported bundle; the caller then sets
    the runtime).

    ``runtime`` is what embeds at inspection, as for a fit (:meth:`Detector.use_runtime`):
    None = ``OKNG_RUNTIME`` or auto, the fastest that works here (the graph is exported
    beside the file the first time); ``"torch"`` = PyTorch, nothing exported. A fitted
    detector and the same model loaded back give identical scores on the same runtime."""
    path = Path(path)
    meta, tensors, digest = _read_checked(path)
    cfg = dict(meta["config"])
    if meta["format_version"] < 2:
        cfg.setdefault("bit_depth", 16)  # format 1 read 16-bit images as a fixed 16-bit depth
    try:
        config = DetectorConfig.from_dict(cfg)
        cls = model_class(meta["model"]["kind"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid settings in the model file ({exc})") from None
    # a fit records the tiling it resolved; files written before tiling existed have none (whole images)
    require(config.tile is None or (config.tiled and config.tile_overlap is not None), path,
             f"the model's tiling is not a fitted one (tile {config.tile!r}, overlap {config.tile_overlap!r})")
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
    # Declared sizes are checked against the backbone and against the tensors actually in the
    # file BEFORE the model is built: a model allocates its state from (grid, n_channels)
    # (PaDiM: grid*C*C float64), so a forged header could otherwise make it allocate GBs.
    grid, n_channels = tuple(meta["model"]["grid"]), meta["model"]["n_channels"]
    idx = tensors.pop("embedding.channel_idx", None)
    require(idx is not None and idx.dim() == 1 and idx.dtype == torch.int64, path, "channel indices missing")
    require(idx.numel() == n_channels, path, "channel indices do not match the model")
    total = sum(extractor.stage_channels)
    require(n_channels <= total and int(idx.unique().numel()) == n_channels
             and int(idx.min()) >= 0 and int(idx.max()) < total,
             path, f"channel indices invalid for this backbone ({total} channels)")
    stride = extractor.stage_strides[0]
    backbone_grid = (-(-config.image_size // stride),) * 2
    require(grid == backbone_grid, path,
             f"model grid {list(grid)} does not match the backbone's {list(backbone_grid)}")
    weights = tensors.pop("model_weights.channels", None)
    cal_scores = tensors.pop("thresholds.calibration_scores", torch.zeros(0, dtype=torch.float64))
    cal_peaks = tensors.pop("thresholds.calibration_peaks", torch.zeros(0, dtype=torch.float64))
    for name, t in (("calibration_scores", cal_scores), ("calibration_peaks", cal_peaks)):
        require(t.dim() == 1 and t.is_floating_point(), path, f"threshold {name} invalid")
    cal_emb = tensors.pop("calibration.embeddings", None)
    require(cal_emb is None or (cal_emb.dtype == torch.float16 and cal_emb.dim() == 4
                                 and tuple(cal_emb.shape[1:]) == (n_channels, *grid)
                                 and cal_emb.shape[0] == cal_scores.numel()),
             path, "calibration embeddings have the wrong shape")
    memory_t = {k[len("feedback_memory."):]: tensors.pop(k) for k in list(tensors) if k.startswith("feedback_memory.")}
    evidence_t = {k[len("feedback_evidence."):]: tensors.pop(k) for k in list(tensors)
                  if k.startswith("feedback_evidence.")}
    model_t = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_model_shapes(cls, grid, n_channels, meta["model"]["params"], model_t, path, meta_device=True)
    try:
        model = cls(grid, n_channels, **meta["model"]["params"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid settings in the model file ({exc})") from None
    _check_model_shapes(model, grid, n_channels, None, model_t, path, meta_device=False)
    try:
        det = Detector(config, extractor, idx.numpy(), model)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    require(tuple(det.embedder.grid_size) == tuple(model.grid), path, "model grid does not match the backbone")
    model.load_tensors(model_t)
    if weights is not None:
        require(tuple(weights.shape) == (model.n_channels,) and weights.is_floating_point(), path,
                 "channel weights have the wrong shape")
        model.set_channel_weights(weights)
    th = meta.get("thresholds")
    if th is not None:
        det.thresholds = Thresholds(float(th["image"]), float(th["pixel"]), cal_scores.numpy(), cal_peaks.numpy(),
                                    float(th["target_false_alarm_rate"]))
    det.calibration_embeddings = cal_emb
    held_out = tuple(meta.get("calibration_paths") or ())  # a list of strings (check_meta)
    det.calibration_paths = held_out if len(held_out) == cal_scores.numel() else ()
    fb = meta.get("feedback") or {}
    labels = fb.get("applied_labels", []) if isinstance(fb, dict) else None
    require(isinstance(labels, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in labels),
             path, "the list of applied labels is damaged")
    det.applied_labels = tuple(labels)
    det.memory = _load_memory(meta.get("feedback_memory"), memory_t, model, path)
    det.feedback_evidence = _load_evidence(evidence_t, model, path)
    if model.n_samples > 0 and not derived_cache.restore(model, path, digest):
        det.finalize()
        derived_cache.store(model, path, digest)  # a model saved before the cache existed
    det.model_path = str(path)
    if isinstance(extractor, FeatureExtractor):
        det.use_runtime(runtime)
    return det


def _load_evidence(t: dict[str, torch.Tensor], model, path: Path) -> dict[str, torch.Tensor] | None:
    """What reweighting learnt from the model's labels, shapes and dtypes checked; None in a
    file without it (written before it was saved, or with no labels)."""
    if not t:
        return None
    c, (h, w) = model.n_channels, model.grid
    want = {"fa_shares": ((c,), torch.float32), "defect_shares": ((c,), torch.float32),
            "defect_embeddings": ((c, h, w), torch.float16)}
    require(set(t) == set(want), path, f"feedback evidence tensors {sorted(t)} do not match {sorted(want)}")
    for name, (shape, dtype) in want.items():
        v = t[name]
        require(v.dtype == dtype and v.dim() == len(shape) + 1 and tuple(v.shape[1:]) == shape
                 and bool(torch.isfinite(v).all()), path,
                 f"feedback evidence {name!r} is {v.dtype} {tuple(v.shape)}, expected {dtype} (N, {shape})")
    return t


def _load_memory(params: dict[str, Any] | None, t: dict[str, torch.Tensor], model, path: Path):
    """The feedback memory from its settings and tensors, every shape and dtype checked."""
    from .feedback_memory import FeedbackMemory

    if params is None:
        require(not t, path, "feedback memory tensors without its settings")
        return None
    types = {"radius": (int, type(None)), "low": (int, float), "high": (int, float), "candidates": int,
             "shortlist": int, "channel_groups": list, "step": int, "floor": (int, float),
             "grow": (int, float, type(None)), "footprint": (int, float, type(None)), "distinct": bool}
    for key, value in params.items():
        number = types.get(key) is not bool and not isinstance(value, bool)  # True is an int too
        require(key in types and isinstance(value, types[key]) and (number or types[key] is bool), path,
                 f"feedback memory setting {key!r} invalid")
    groups = params.get("channel_groups")
    require(groups is None or all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 64 for g in groups),
             path, "feedback memory channel groups invalid")
    # files from before connected matches, print outlines or distinctive blocks existed score
    # without them: reopened exactly
    params = {"grow": None, "footprint": None, "distinct": False, **params}
    try:
        memory = FeedbackMemory(model.grid, model.n_channels, **params)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid feedback memory settings ({exc})") from None
    expected = memory.expected(t)
    require(set(t) == set(expected), path, f"feedback memory tensors {sorted(t)} do not match {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        require(tuple(t[name].shape) == shape and t[name].dtype == dtype, path,
                 f"feedback memory tensor {name!r} is {t[name].dtype} {tuple(t[name].shape)}, expected {dtype} {shape}")
    h, w = model.grid
    require(bool(((t["pos"][:, 0] >= 0) & (t["pos"][:, 0] < h) & (t["pos"][:, 1] >= 0) & (t["pos"][:, 1] < w)).all()),
             path, "feedback memory positions lie off the grid")
    n_clicks = int(t["n_clicks"].reshape(-1)[0])
    require(n_clicks >= 0 and bool(((t["click"] >= 0) & (t["click"] < n_clicks)).all()), path,
             "feedback memory click numbers invalid")
    memory.load_tensors(t)
    return memory


def _check_model_shapes(model_or_cls, grid, n_channels, params, model_t, path: Path, meta_device: bool) -> None:
    """Compare the stored model tensors with the shapes the model expects.

    With ``meta_device`` the model is first built on PyTorch's "meta" device, which records
    shapes without allocating memory, so oversized declarations are refused for free. A model
    whose constructor cannot run on the meta device is checked after the real construction.
    """
    if meta_device:
        try:
            with torch.device("meta"):
                model_or_cls = model_or_cls(grid, n_channels, **params)
            expected = model_or_cls.expected_shapes(model_t)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: invalid settings in the model file ({exc})") from None
        except Exception:  # noqa: BLE001 - constructor not meta-compatible: check after building
            log.debug("meta-device shape check skipped for %s", model_or_cls)
            return
    else:
        expected = model_or_cls.expected_shapes(model_t)
    kind = getattr(model_or_cls, "kind", "?")
    require(set(model_t) == set(expected), path,
             f"model tensors {sorted(model_t)} do not match {kind}'s {sorted(expected)}")
    for name, shape in expected.items():
        require(tuple(model_t[name].shape) == tuple(shape), path,
                 f"tensor {name!r} has shape {tuple(model_t[name].shape)}, expected {tuple(shape)}")
    try:  # dtypes too: same-size bytes of another type (I64 for F64) pass the shape check
        reference = {k: v.dtype for k, v in model_or_cls.tensors().items()}
    except Exception:  # noqa: BLE001 - a model may not expose tensors before fitting
        reference = {}
    for name, dtype in reference.items():
        if name in model_t:
            require(model_t[name].dtype == dtype, path,
                     f"tensor {name!r} is {model_t[name].dtype}, expected {dtype}; the file is damaged")
