"""Fast inference: the embedding exported once to ONNX, run by OpenVINO or ONNX Runtime.

The backbone is most of every inspection. What :class:`~core.embedding.Embedder` computes
(normalisation, backbone stages, the kept channels of each stage upsampled to the finest grid,
concatenated) is exported as one ONNX graph with a dynamic batch size and run by the fastest
installed runtime; the normality model and everything after it stay as they are, so
``Detector.embed`` returns the same (B, C, h, w) float32 whatever runs it.

- **Runtimes**: ``openvino`` (fastest here), ``onnxruntime``, ``torch`` (the reference, always
  there); ``auto`` takes the first that is installed, exports and agrees with PyTorch on a
  probe image. ``OKNG_RUNTIME`` sets the default, ``okng score --runtime`` forces one.
- **Same answers**: a runtime is used only after its output on a probe batch agrees with
  PyTorch's to 1e-4 of the embedding's range (OpenVINO is pinned to float32: on CPUs with
  bfloat16 units it would otherwise compute in bfloat16).
- **Cache**: the graph is written next to the model file as ``<model>.embed-<key>.onnx``
  (a detector without a file, or in a read-only folder: ``~/.cache/okng``, or
  ``OKNG_CACHE_DIR``). The key hashes everything the graph depends on (backbone, weights
  identity, stages, input size, channel indices, torch and timm versions), so a changed
  model gets a new graph and the stale one next to it is removed.
- **Never an error for the operator**: a failed export, a missing or failing runtime falls
  back to the next one, down to torch, with the reason logged (and kept in
  :attr:`Selection.notes`).
- **Threads**: ``OKNG_NUM_THREADS``, else ``torch.get_num_threads()``.

Example:
    >>> sel = select_runtime(det.embedder, "auto", model_path="cells.okng")
    >>> sel.runtime.name, sel.notes                 # ("openvino", [])
    >>> emb = sel.runtime(batch)                    # (B, C, h, w) float32, same as det.embedder(batch)
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import graph_runtime as _gr
from .embedding import Embedder, combine_stages
from .graph_runtime import (  # noqa: F401 - the torch-free half, re-exported (see its docstring)
    AGREEMENT, CHOICES, EXPORT_VERSION, INPUT_NAME, N_CHECK_SAMPLES, OPSET, OUTPUT_NAME, RUNTIMES, EmbeddingRuntime,
    OnnxRuntimeEmbedding, OpenVinoEmbedding, RuntimeUnavailable, _complete, _copy_graph, _graph_names, backbone_info,
    cache_dir, check_description, default_runtime, description_path, dumps, graph_key_for, installed_runtimes,
    num_threads, open_checked, open_runtime, read_graph_description, recorded_deviation,
)

log = logging.getLogger(__name__)


def probe_batch(image_size: int, n: int = 2) -> torch.Tensor:
    """:func:`core.graph_runtime.probe_batch` as a torch tensor (the same values)."""
    return torch.from_numpy(_gr.probe_batch(image_size, n))


def legacy_probe_batch(image_size: int, n: int = 2) -> torch.Tensor:
    """The first probe batch (graphs and bundles exported before ``check.probe_version``):
    kept to check those against the values they recorded."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, image_size), torch.linspace(0, 1, image_size), indexing="ij")
    imgs = []
    for i in range(n):
        f = 3.0 + 4.0 * i
        r = 0.5 + 0.5 * torch.sin(f * 6.28 * xx) * torch.cos(f * 3.14 * yy)
        g = (xx * (1 + i) + yy) % 1.0
        b = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1 * (i + 1)).float()
        imgs.append(torch.stack([r, g, b]))
    return torch.stack(imgs).float().contiguous()


# ------------------------------------------------------------------------ the graph
def graph_key(embedder: Embedder) -> str:
    ex = embedder.extractor
    return graph_key_for(ex.spec, ex.weights_identity, embedder.channel_idx)


def describe_graph(embedder: Embedder, key: str | None = None) -> dict:
    """What a tool needs to feed the graph and read its output, and PyTorch's output on the
    probe batch at sample points (to check a runtime against without the backbone). The
    same fields appear in an exported bundle's bundle.json."""
    ex = embedder.extractor
    s = ex.spec.image_size
    h, w = embedder.grid_size
    with torch.inference_mode():
        flat = embedder(probe_batch(s)).reshape(-1).numpy()
    idx = np.unique(np.linspace(0, flat.size - 1, min(flat.size, N_CHECK_SAMPLES)).round().astype(np.int64))
    return {
        "key": key or graph_key(embedder),
        "embedding_graph": {
            "opset": OPSET,
            "input": {
                "name": INPUT_NAME, "shape": ["batch", 3, s, s], "dtype": "float32", "layout": "NCHW",
                "channel_order": "RGB", "value_range": [0.0, 1.0],
                "resize": {"size": [s, s], "interpolation": "OpenCV INTER_AREA when shrinking, INTER_LINEAR "
                                                         "when enlarging; the whole image, no crop"},
                "normalisation": {"mean": list(ex.norm_mean), "std": list(ex.norm_std), "in_graph": True},
            },
            "output": {"name": OUTPUT_NAME, "shape": ["batch", embedder.n_channels, h, w], "dtype": "float32"},
        },
        "backbone": {
            "name": ex.spec.name, "weights": ex.weights_identity, "weights_setting": ex.spec.weights,
            "stages": list(ex.spec.stages), "stage_channels": list(ex.stage_channels),
            "stage_strides": list(ex.stage_strides),
        },
        "embedding": {"channel_indices": [int(i) for i in embedder.channel_idx], "grid": [h, w]},
        "check": {
            "probe": f"core.graph_runtime.probe_batch({s}, 2)",
            "probe_version": _gr.PROBE_VERSION,
            "tolerance": AGREEMENT,
            "range": float(flat.max() - flat.min()),
            "sample_index": idx.tolist(),
            "sample_values": [float(v) for v in flat[idx]],
        },
    }


class EmbeddingGraph(torch.nn.Module):
    """The module that is exported: exactly :meth:`Embedder.__call__`, grid size fixed."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        if not embedder.has_backbone:
            raise RuntimeUnavailable("no backbone to export (the model was loaded from an exported bundle)")
        self.extractor = embedder.extractor
        self.per_stage = embedder.stage_indices
        with torch.inference_mode():
            probe = torch.zeros(1, 3, embedder.extractor.spec.image_size, embedder.extractor.spec.image_size)
            first = embedder.extractor(probe)[0]
        self.size = (int(first.shape[-2]), int(first.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_stages(self.extractor.features(x), self.per_stage, self.size)


def export_embedding(embedder: Embedder, path: str | os.PathLike[str]) -> Path:
    """Write the embedding as an ONNX graph (dynamic batch), atomically; returns the path.

    Uses PyTorch's TorchScript exporter (``dynamo=False``): it handles timm's EfficientNets
    and needs no extra package beyond ``onnx``.
    """
    from .atomic import write_atomic, write_bytes_atomic

    try:
        import onnx  # noqa: F401 - the exporter needs it; fail with a clear reason here
    except ImportError:
        raise RuntimeUnavailable("cannot export the embedding: the onnx package is not installed") from None
    path = Path(path)
    module = EmbeddingGraph(embedder).eval()
    s = embedder.extractor.spec.image_size
    probe = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: nothing actionable
            torch.onnx.export(
                module, (probe,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)
    write_bytes_atomic(description_path(path), dumps(describe_graph(embedder)).encode())
    log.info("exported the embedding graph to %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def _remove_stale(sibling: Path) -> None:
    """Other keys' graphs (and descriptions) next to the same model file are stale: remove them."""
    prefix = sibling.name.split(".embed-")[0] + ".embed-"
    keep = {sibling, description_path(sibling)}
    for p in sibling.parent.glob(f"{prefix}*"):
        if p not in keep and p.suffix in (".onnx", ".json"):
            try:
                p.unlink()
                log.info("removed stale embedding graph file %s", p)
            except OSError:
                pass


def ensure_graph(embedder: Embedder, model_path: str | os.PathLike[str] | None = None, rebuild: bool = False) -> Path:
    """The embedding graph for this embedder: found next to the model file, else in the user
    cache (and copied next to the model), else exported. ``rebuild`` discards what is there.
    Each graph has its description beside it (:func:`description_path`)."""
    sibling, user = _graph_names(graph_key(embedder), model_path)
    if rebuild:
        for p in (sibling, user):
            if p is not None:
                p.unlink(missing_ok=True)
                description_path(p).unlink(missing_ok=True)
    if _complete(sibling):
        return sibling
    if _complete(user):
        if sibling is None:
            return user
        try:
            _copy_graph(user, sibling)
            _remove_stale(sibling)
            return sibling
        except OSError as exc:
            log.info("cannot place the embedding graph next to %s (%s); using the cache", model_path, exc)
            return user
    if sibling is not None:
        try:
            export_embedding(embedder, sibling)
            _remove_stale(sibling)
            try:  # the user cache too: the next fit or copy of this model finds it
                _copy_graph(sibling, user)
            except OSError:
                pass
            return sibling
        except OSError as exc:  # read-only folder, full disk: the user cache may still do
            log.info("cannot write the embedding graph next to %s (%s); using the cache", model_path, exc)
    return export_embedding(embedder, user)


def load_for_inspection(path: str | os.PathLike[str], runtime: str | None = None):
    """A model file, ready to inspect on ``runtime`` (None: ``OKNG_RUNTIME`` or auto).

    When the model's graph and its description are cached (beside the file or in the user
    cache) and an ONNX runtime reproduces the recorded probe values, the detector is built
    without the backbone's code: no timm import, no weights (about 2 s less to start). It
    loads the backbone later only if asked to run on torch. Otherwise this is
    :func:`~core.persistence.load_detector` then :meth:`Detector.use_runtime`.
    """
    from safetensors import safe_open

    from .detector import DetectorConfig
    from .persistence import load_detector

    requested = (runtime or default_runtime()).lower()
    if requested not in CHOICES:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(CHOICES)}")
    notes: list[str] = []
    if requested != "torch":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["okng"])
                idx = f.get_tensor("embedding.channel_idx").numpy()
            config = DetectorConfig.from_dict(dict(meta["config"]))
            key = graph_key_for(config.backbone_spec(), str(meta["backbone"]["weights"]), idx)
            for graph in _graph_names(key, path):
                if not _complete(graph):
                    continue
                d = read_graph_description(description_path(graph))
                info = backbone_info(d)
                if info.spec != config.backbone_spec() or d.get("key") != key:
                    continue
                rt, notes = open_checked(graph, d, requested)
                if rt is None:
                    break
                det = load_detector(path, extractor=info)
                det.set_runtime(rt)
                det.runtime_notes = notes
                if graph.parent == cache_dir() and graph != _graph_names(key, path)[0]:
                    try:  # place it beside the model for next time
                        _copy_graph(graph, _graph_names(key, path)[0])
                    except OSError:
                        pass
                return det
        except Exception as exc:  # noqa: BLE001 - any doubt: the full load below decides, with its errors
            log.info("fast load of %s not possible (%s: %s); loading the backbone", path,
                     exc.__class__.__name__, str(exc)[:160])
    det = load_detector(path, runtime=requested)
    det.runtime_notes = notes + [n for n in det.runtime_notes if n not in notes]
    return det


# ------------------------------------------------------------------------ runtimes
class TorchEmbedding:
    """The reference: PyTorch running the embedder itself."""

    name = "torch"

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.embedder(batch)


def disagreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest absolute difference as a share of the reference's range (inf on a shape mismatch)."""
    if tuple(reference.shape) != tuple(other.shape):
        return float("inf")
    span = float(reference.max() - reference.min()) or 1.0
    return float((reference - other).abs().max()) / span


def check_agreement(runtime: EmbeddingRuntime, embedder: Embedder) -> float:
    """Compare a runtime with PyTorch on the probe batch; raise if it disagrees."""
    probe = probe_batch(embedder.extractor.spec.image_size)
    try:
        out = torch.as_tensor(runtime(probe))  # the ONNX runtimes answer in numpy
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the graph
        raise RuntimeUnavailable(f"{runtime.name} failed on the probe images ({exc.__class__.__name__}: "
                                 f"{str(exc)[:200]})") from None
    d = disagreement(embedder(probe), out)
    if not d <= AGREEMENT:
        raise RuntimeUnavailable(f"{runtime.name} disagrees with PyTorch on the probe images "
                                 f"({d:.2e} of the range, allowed {AGREEMENT:.0e})")
    return d


def _graph(embedder: Embedder, model_path, rebuild: bool) -> Path:
    try:
        return ensure_graph(embedder, model_path, rebuild=rebuild)
    except RuntimeUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - any exporter failure: the reference will do
        raise RuntimeUnavailable(f"exporting the embedding failed ({exc.__class__.__name__}: "
                                 f"{str(exc)[:200]})") from None


@dataclass
class Selection:
    """The runtime chosen for a detector, and why the faster ones were not."""

    runtime: EmbeddingRuntime
    requested: str
    graph: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.runtime.name


def select_runtime(
    embedder: Embedder,
    requested: str | None = None,
    model_path: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> Selection:
    """The runtime to embed with: ``requested`` if it works, else the next fastest, down to
    torch. Never raises for an unavailable runtime (reasons are logged and kept in
    :attr:`Selection.notes`); raises only for an unknown name."""
    requested = (requested or default_runtime()).lower()
    if requested not in CHOICES:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(CHOICES)}")
    order = list(RUNTIMES) if requested == "auto" else [requested] + [r for r in RUNTIMES if r != requested]
    if requested not in ("auto", "torch"):
        order = [requested, "torch"]  # forced: that one, or the reference, nothing in between
    notes: list[str] = []
    export_error: str | None = None
    for name in order:
        if name == "torch":
            break
        try:
            _gr._import(name)  # through the module: one place to replace it (tests)
            if export_error is not None:
                raise RuntimeUnavailable(export_error)
            try:
                graph = _graph(embedder, model_path, rebuild=False)
            except RuntimeUnavailable as exc:
                export_error = str(exc)
                raise
            try:
                rt = open_runtime(name, graph, threads)
            except RuntimeUnavailable as first:  # a damaged cached graph: export it again once
                log.info("%s; exporting the embedding again", first)
                graph = _graph(embedder, model_path, rebuild=True)
                rt = open_runtime(name, graph, threads)
            check_agreement(rt, embedder)
            log.info("embedding runtime: %s (%d threads, graph %s)", name, getattr(rt, "threads", 0), graph)
            return Selection(rt, requested, graph, notes)
        except RuntimeUnavailable as exc:
            notes.append(f"{name}: {exc}")
            log.warning("embedding runtime %s not used: %s", name, exc)
    return Selection(TorchEmbedding(embedder), requested, None, notes)
