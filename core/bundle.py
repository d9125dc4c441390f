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
fixed probe batch (:func:`core.graph_runtime.probe_batch`) that were recorded with PyTorch at export.

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
import shutil
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from . import __version__
from .atomic import write_bytes_atomic
from .errors import ModelFileError, OkngError
from .graph_runtime import backbone_info, check_description, default_runtime, dumps, open_checked

if TYPE_CHECKING:  # reading a bundle needs no PyTorch (core.lean_inspection); writing one does
    from .detector import Detector

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "okng-bundle"
BUNDLE_VERSION = 1
MODEL_FILE, GRAPH_FILE, DESCRIPTION_FILE = "model.okng", "embedding.onnx", "bundle.json"


def is_bundle(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / DESCRIPTION_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_bundle(det: Detector, graph_sha256: str) -> dict[str, Any]:
    """The bundle.json contents for a detector (see README, *Exported models*)."""
    from .runtime import describe_graph, graph_key

    th, cfg = det.thresholds, det.config
    s = det.image_size
    graph = describe_graph(det.embedder, graph_key(det.embedder))
    graph["embedding_graph"] = {"file": GRAPH_FILE, "sha256": graph_sha256, **graph["embedding_graph"]}
    # before the graph, on each resized image (core.imageio.network_input): another tool must do it too
    graph["embedding_graph"]["input"]["contrast"] = cfg.contrast
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "okng_version": __version__,
        "model_file": MODEL_FILE,
        **graph,
        "model": {"kind": det.model.kind, "n_channels": det.model.n_channels, "grid": list(det.model.grid)},
        "postprocess": {"sigma": cfg.sigma, "pooling": cfg.pooling, "topk": cfg.topk, "map_size": [s, s]},
        "thresholds": None if th is None else {
            "image": th.image, "pixel": th.pixel, "target_false_alarm_rate": th.target_false_alarm_rate},
    }


def export_bundle(det: Detector, out: str | os.PathLike[str]) -> Path:
    """Write ``det`` as a bundle folder (created if needed); returns it."""
    from .persistence import save_detector
    from .runtime import ensure_graph

    if not det.embedder.has_backbone:
        raise OkngError("this model was loaded without its backbone; export from the model file")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OkngError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    previous, held_out = det.model_path, det.calibration_paths
    det.calibration_paths = ()  # the engineer's file paths stay on the engineer's machine
    try:
        save_detector(det, out / MODEL_FILE, cache_derived=False)  # the documented files only
    finally:
        det.model_path, det.calibration_paths = previous, held_out
    try:
        graph = ensure_graph(det.embedder, previous)
    except Exception as exc:  # noqa: BLE001 - the exporter's own errors, as one clear message
        raise OkngError(f"cannot export the embedding graph ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    tmp = out / f".{GRAPH_FILE}.tmp"
    shutil.copyfile(graph, tmp)
    os.replace(tmp, out / GRAPH_FILE)
    desc = describe_bundle(det, _sha256(out / GRAPH_FILE))
    write_bytes_atomic(out / DESCRIPTION_FILE, dumps(desc).encode())
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
    if not (isinstance(d, dict) and d.get("format") == BUNDLE_FORMAT):
        raise ModelFileError(f"{path}: not an OK/NG Station bundle")
    v = d.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ModelFileError(f"{path}: format version missing")
    if v > BUNDLE_VERSION:
        raise ModelFileError(f"{path} was written by a newer OK/NG Station (bundle format {v}); "
                             f"this station reads format {BUNDLE_VERSION}. Update OK/NG Station.")
    check_description(d, path)
    if not isinstance(d["embedding_graph"].get("sha256"), str):
        raise ModelFileError(f"{path}: graph checksum missing")
    return d


def bundle_runtime(folder: Path, runtime: str | None) -> str:
    """The runtime asked for (None: ``OKNG_RUNTIME`` or auto); ``torch`` is refused."""
    requested = (runtime or default_runtime()).lower()
    if requested == "torch":
        raise OkngError(f"{folder} is an exported model: it runs with onnxruntime or openvino, not torch "
                        "(score the model file itself to use PyTorch)")
    return requested


def checked_graph(folder: Path) -> tuple[dict[str, Any], Path]:
    """(bundle.json, the graph's path) once the graph is there and matches its SHA-256."""
    d = read_description(folder)
    graph = folder / str(d["embedding_graph"].get("file", GRAPH_FILE))
    if not graph.is_file():
        raise ModelFileError(f"{folder}: the embedding graph {graph.name} is missing")
    if _sha256(graph) != d["embedding_graph"]["sha256"]:
        raise ModelFileError(f"{graph} does not match {DESCRIPTION_FILE} (SHA-256 differs): the bundle is damaged")
    return d, graph


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
    requested = bundle_runtime(folder, runtime)
    d, graph = checked_graph(folder)
    info = backbone_info(d)
    det = load_detector(folder / str(d.get("model_file", MODEL_FILE)), extractor=info)
    expected = tuple(d["embedding_graph"]["output"]["shape"][1:])
    if expected != (det.embedder.n_channels, *det.embedder.grid_size):
        raise ModelFileError(f"{folder}: the graph's output {list(expected)} does not match the model")
    rt, notes = open_checked(graph, d, requested)
    if rt is None:
        raise OkngError(f"cannot run the exported model {folder}: " + "; ".join(notes)
                        + ". Install one of them: pip install onnxruntime (or openvino)")
    det.set_runtime(rt)
    det.runtime_notes = notes
    return det
