"""Exported models: a folder that runs without the backbone's code or weights.

``okng export MODEL --out DIR`` writes::

    DIR/model.okng       the model file itself (core/persistence.py: statistics, channel
                         indices, thresholds, calibration), unchanged format
    DIR/embedding.onnx   the embedding as one ONNX graph: RGB in [0, 1] -> (N, C, h, w)
    DIR/bundle.json      what another tool needs to feed the graph and read its output

A bundle loads with :func:`load_bundle` (and ``okng score --model DIR``) with ONNX Runtime or
OpenVINO and neither timm nor the backbone's weights package: the backbone is described by a
:class:`~core.backbone.BackboneInfo`, and only the graph runs it. On load the graph's SHA-256
is checked, and the chosen runtime must reproduce sample values of the graph's output on a
fixed probe batch (:func:`core.runtime.probe_batch`) that were recorded with PyTorch at export.

Example:
    >>> export_bundle(load_detector("cells.okng"), "cells-bundle")
    >>> det = load_bundle("cells-bundle")          # det.runtime_name == "openvino"
    >>> det.inspect([load_image("part.png")])[0].verdict
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import write_bytes_atomic
from .backbone import BackboneInfo, BackboneSpec
from .detector import Detector
from .errors import ModelFileError, OkngError
from .runtime import (
    AGREEMENT, INPUT_NAME, OPSET, OUTPUT_NAME, RUNTIMES, RuntimeUnavailable, default_runtime, ensure_graph,
    open_runtime, probe_batch,
)

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "okng-bundle"
BUNDLE_VERSION = 1
MODEL_FILE, GRAPH_FILE, DESCRIPTION_FILE = "model.okng", "embedding.onnx", "bundle.json"
#: how many values of the probe embedding bundle.json keeps to check a runtime on load
N_CHECK_SAMPLES = 1024


def is_bundle(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / DESCRIPTION_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sample_index(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, N_CHECK_SAMPLES)).round().astype(np.int64))


def describe_bundle(det: Detector, graph_sha256: str, probe_embedding: torch.Tensor) -> dict[str, Any]:
    """The bundle.json contents for a detector (see README, *Exported models*)."""
    ex, emb, th, cfg = det.extractor, det.embedder, det.thresholds, det.config
    s = ex.spec.image_size
    h, w = emb.grid_size
    flat = probe_embedding.reshape(-1).numpy()
    idx = _sample_index(flat.size)
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "okng_version": __version__,
        "model_file": MODEL_FILE,
        "embedding_graph": {
            "file": GRAPH_FILE,
            "sha256": graph_sha256,
            "opset": OPSET,
            "input": {
                "name": INPUT_NAME, "shape": ["batch", 3, s, s], "dtype": "float32", "layout": "NCHW",
                "channel_order": "RGB", "value_range": [0.0, 1.0],
                "resize": {"size": [s, s], "interpolation": "OpenCV INTER_AREA when shrinking, INTER_LINEAR "
                                                         "when enlarging; the whole image, no crop"},
                "normalisation": {"mean": list(ex.norm_mean), "std": list(ex.norm_std), "in_graph": True},
            },
            "output": {"name": OUTPUT_NAME, "shape": ["batch", emb.n_channels, h, w], "dtype": "float32"},
        },
        "backbone": {
            "name": ex.spec.name, "weights": ex.weights_identity, "weights_setting": ex.spec.weights,
            "stages": list(ex.spec.stages), "stage_channels": list(ex.stage_channels),
            "stage_strides": list(ex.stage_strides),
        },
        "embedding": {"channel_indices": [int(i) for i in emb.channel_idx], "grid": [h, w]},
        "model": {"kind": det.model.kind, "n_channels": det.model.n_channels, "grid": list(det.model.grid)},
        "postprocess": {"sigma": cfg.sigma, "pooling": cfg.pooling, "topk": cfg.topk, "map_size": [s, s]},
        "thresholds": None if th is None else {
            "image": th.image, "pixel": th.pixel, "target_false_alarm_rate": th.target_false_alarm_rate},
        "check": {
            "probe": f"core.runtime.probe_batch({s}, 2)",
            "tolerance": AGREEMENT,
            "range": float(flat.max() - flat.min()),
            "sample_index": idx.tolist(),
            "sample_values": [float(v) for v in flat[idx]],
        },
    }


def _dumps(d: dict[str, Any]) -> str:
    """Indented JSON with lists of numbers and strings kept on one line."""
    text = json.dumps(d, indent=1)
    return re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]"
                  if m.group(1).strip() else "[]", text)


def export_bundle(det: Detector, out: str | os.PathLike[str]) -> Path:
    """Write ``det`` as a bundle folder (created if needed); returns it."""
    from .persistence import save_detector

    if not det.embedder.has_backbone:
        raise OkngError("this model was loaded from a bundle already; export from the model file")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OkngError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    previous = det.model_path
    try:
        save_detector(det, out / MODEL_FILE)
    finally:
        det.model_path = previous
    try:
        graph = ensure_graph(det.embedder, previous)
    except Exception as exc:  # noqa: BLE001 - the exporter's own errors, as one clear message
        raise OkngError(f"cannot export the embedding graph ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    tmp = out / f".{GRAPH_FILE}.tmp"
    shutil.copyfile(graph, tmp)
    os.replace(tmp, out / GRAPH_FILE)
    with torch.inference_mode():
        probe = det.embedder(probe_batch(det.image_size))
    desc = describe_bundle(det, _sha256(out / GRAPH_FILE), probe)
    write_bytes_atomic(out / DESCRIPTION_FILE, _dumps(desc).encode())
    return out


def read_description(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check bundle.json (types and sizes) without trusting it."""
    folder = Path(folder)
    path = folder / DESCRIPTION_FILE
    if not path.is_file():
        raise ModelFileError(f"{folder} is not an exported model (no {DESCRIPTION_FILE})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is damaged ({str(exc)[:120]})") from None

    def require(cond: bool, what: str) -> None:
        if not cond:
            raise ModelFileError(f"{path}: {what}")

    require(isinstance(d, dict) and d.get("format") == BUNDLE_FORMAT, "not an OK/NG Station bundle")
    v = d.get("format_version")
    require(isinstance(v, int) and not isinstance(v, bool), "format version missing")
    if v > BUNDLE_VERSION:
        raise ModelFileError(f"{path} was written by a newer OK/NG Station (bundle format {v}); "
                             f"this station reads format {BUNDLE_VERSION}. Update OK/NG Station.")
    for key in ("embedding_graph", "backbone", "check"):
        require(isinstance(d.get(key), dict), f"field {key!r} missing")
    g, b, c = d["embedding_graph"], d["backbone"], d["check"]
    require(isinstance(g.get("sha256"), str) and isinstance(g.get("input"), dict), "graph description invalid")
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)  # noqa: E731
    nums = lambda xs: isinstance(xs, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
                                                   for x in xs)
    require(isinstance(b.get("name"), str) and isinstance(b.get("weights"), str), "backbone name/weights invalid")
    require(b.get("weights_setting") is None or isinstance(b.get("weights_setting"), str), "weights setting invalid")
    require(ints(b.get("stages")) and ints(b.get("stage_channels")) and ints(b.get("stage_strides"))
            and len(b["stages"]) == len(b["stage_channels"]) == len(b["stage_strides"]), "backbone stages invalid")
    norm = g["input"].get("normalisation")
    require(isinstance(norm, dict) and nums(norm.get("mean")) and nums(norm.get("std")), "normalisation invalid")
    shape = g["input"].get("shape")
    require(isinstance(shape, list) and len(shape) == 4 and ints(shape[1:]), "input shape invalid")
    require(ints(c.get("sample_index")) and nums(c.get("sample_values"))
            and len(c["sample_index"]) == len(c["sample_values"]) and isinstance(c.get("range"), (int, float)),
            "check values invalid")
    return d


def _backbone_info(d: dict[str, Any]) -> BackboneInfo:
    b, g = d["backbone"], d["embedding_graph"]["input"]
    try:
        spec = BackboneSpec(b["name"], tuple(b["stages"]), int(g["shape"][2]), b.get("weights_setting"))
    except ValueError as exc:
        raise ModelFileError(f"bundle backbone invalid: {exc}") from None
    norm = g["normalisation"]
    return BackboneInfo(spec, b["weights"], tuple(b["stage_channels"]), tuple(b["stage_strides"]),
                        tuple(float(x) for x in norm["mean"]), tuple(float(x) for x in norm["std"]))


def _check_runtime(rt, d: dict[str, Any], image_size: int) -> float:
    """Largest deviation, as a share of the range, of the runtime's probe output from the
    values PyTorch gave at export."""
    c = d["check"]
    out = rt(probe_batch(image_size)).reshape(-1).numpy()
    idx = np.asarray(c["sample_index"], dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= out.size):
        return float("inf")
    dev = np.abs(out[idx].astype(np.float64) - np.asarray(c["sample_values"], np.float64))
    return float(dev.max(initial=0.0)) / (float(c["range"]) or 1.0)


def load_bundle(folder: str | os.PathLike[str], runtime: str | None = None) -> Detector:
    """A detector from an exported bundle, embedding with ONNX Runtime or OpenVINO.

    ``runtime``: ``auto``/None (the fastest installed that passes the check), ``openvino`` or
    ``onnxruntime`` (that one if it works, else the other, with the reason in
    :attr:`Detector.runtime_notes`). ``torch`` is refused: a bundle carries no PyTorch
    backbone. Raises :class:`ModelFileError` for a damaged bundle and :class:`OkngError` when
    neither runtime is usable.
    """
    from .persistence import load_detector

    folder = Path(folder)
    d = read_description(folder)
    requested = (runtime or default_runtime()).lower()
    if requested == "torch":
        raise OkngError(f"{folder} is an exported model: it runs with onnxruntime or openvino, not torch "
                        "(score the model file itself to use PyTorch)")
    graph = folder / str(d["embedding_graph"].get("file", GRAPH_FILE))
    if not graph.is_file():
        raise ModelFileError(f"{folder}: the embedding graph {graph.name} is missing")
    if _sha256(graph) != d["embedding_graph"]["sha256"]:
        raise ModelFileError(f"{graph} does not match {DESCRIPTION_FILE} (SHA-256 differs): the bundle is damaged")
    info = _backbone_info(d)
    det = load_detector(folder / str(d.get("model_file", MODEL_FILE)), extractor=info)
    expected = tuple(d["embedding_graph"]["output"]["shape"][1:])
    if expected != (det.embedder.n_channels, *det.embedder.grid_size):
        raise ModelFileError(f"{folder}: the graph's output {list(expected)} does not match the model")
    names = [n for n in RUNTIMES if n != "torch"]
    order = names if requested == "auto" else [requested] + [n for n in names if n != requested]
    notes = []
    for name in order:
        try:
            rt = open_runtime(name, graph)
            dev = _check_runtime(rt, d, det.image_size)
            if not dev <= float(d["check"].get("tolerance", AGREEMENT)):
                raise RuntimeUnavailable(f"{name} disagrees with the values recorded at export "
                                         f"({dev:.2e} of the range)")
        except RuntimeUnavailable as exc:
            notes.append(f"{name}: {exc}")
            log.warning("bundle runtime %s not used: %s", name, exc)
            continue
        det.set_runtime(rt)
        det.runtime_notes = notes
        return det
    raise OkngError(f"cannot run the exported model {folder}: " + "; ".join(notes)
                    + ". Install one of them: pip install onnxruntime (or openvino)")
