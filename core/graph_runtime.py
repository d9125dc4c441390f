"""The exported embedding graph on ONNX Runtime or OpenVINO: numpy in, numpy out, no PyTorch.

The half of :mod:`core.runtime` that does not need PyTorch: the runtime names and defaults,
where graphs are cached, reading and checking a graph's description, and the two ONNX
runtimes (``(B, 3, S, S)`` float32 RGB in [0, 1] -> ``(B, C, h, w)`` float32, numpy arrays; a
CPU torch tensor is accepted as input). Exporting a graph and checking a runtime against the
PyTorch backbone stay in :mod:`core.runtime`, which re-exports everything here.

Inspection without PyTorch (:mod:`core.lean_inspection`) uses this module only, so nothing
here may import torch or timm (``tests/core/test_lean_inspection.py`` checks it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from .backbone_spec import BackboneInfo, BackboneSpec
from .errors import ModelFileError, OkngError

log = logging.getLogger("core.runtime")  # one logger for the runtime choice, as before the split

#: fastest first (benchmarks/bench_runtime.py); ``auto`` takes the first that works
RUNTIMES = ("openvino", "onnxruntime", "torch")
CHOICES = ("auto",) + RUNTIMES
#: bump when the exported graph or its description changes for the same inputs (invalidates
#: every cached graph); 2: the check values are recorded on probe version 2 (:func:`probe_batch`)
EXPORT_VERSION = 2
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
#: a runtime must reproduce PyTorch's probe embedding to this share of its range
AGREEMENT = 1e-4
#: values of the probe embedding a graph's description keeps to check runtimes against
N_CHECK_SAMPLES = 1024

class RuntimeUnavailable(OkngError):
    """A runtime cannot be used here (not installed, export failed, disagrees with PyTorch)."""


class EmbeddingRuntime(Protocol):
    """Runs the embedding: (B, 3, S, S) float32 RGB in [0, 1] -> (B, C, h, w) float32."""

    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def default_runtime() -> str:
    """``OKNG_RUNTIME`` if set to a known name, else ``auto``."""
    value = os.environ.get("OKNG_RUNTIME", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        log.warning("OKNG_RUNTIME=%s is not one of %s; using auto", value, ", ".join(CHOICES))
        return "auto"
    return value


def num_threads() -> int:
    """``OKNG_NUM_THREADS`` if set, else PyTorch's own setting."""
    raw = os.environ.get("OKNG_NUM_THREADS", "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            log.warning("OKNG_NUM_THREADS=%s is not a number; using the default", raw)
    torch = sys.modules.get("torch")  # loaded by the engine; inspection without it never loads it
    if torch is not None:
        return max(1, torch.get_num_threads())
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def cache_dir() -> Path:
    """Where graphs of detectors without a (writable) model folder live."""
    env = os.environ.get("OKNG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "okng"


def installed_runtimes() -> list[str]:
    """The runtimes whose package imports here, fastest first (torch always)."""
    out = []
    for name in RUNTIMES:
        if name == "torch":
            out.append(name)
            continue
        try:
            _import(name)
            out.append(name)
        except RuntimeUnavailable:
            pass
    return out


def _import(name: str):
    try:
        if name == "openvino":
            import openvino

            return openvino
        import onnxruntime

        return onnxruntime
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken binary wheel
        raise RuntimeUnavailable(f"{name} is not installed ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def _timm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timm")  # without importing it (1.5 s): a bundle or a cached graph needs no timm
    except PackageNotFoundError:
        return "?"


def torch_version() -> str:
    """PyTorch's version, without importing it when it is not loaded yet (the installed
    package's metadata; the same number, maybe without the ``+cpu``/``+cu130`` build tag);
    ``"?"`` when PyTorch is not installed."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "?"


def graph_key_for(spec: BackboneSpec, weights_identity: str, channel_idx: np.ndarray) -> str:
    """16 hex digits naming everything the exported graph depends on."""
    desc = {
        "export": EXPORT_VERSION, "opset": OPSET, "backbone": spec.name, "weights": weights_identity,
        "stages": list(spec.stages), "image_size": spec.image_size,
        "channels": hashlib.sha256(np.ascontiguousarray(channel_idx, np.int64).tobytes()).hexdigest(),
        "torch": torch_version().split("+")[0], "timm": _timm_version(),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def description_path(graph: Path) -> Path:
    """The JSON beside a graph that describes it (same name, ``.json``)."""
    return graph.with_suffix(".json")


def check_description(d, where: object) -> dict:
    """Type-check a graph description (or bundle.json) read from disk; raises ModelFileError."""
    def require(cond: bool, what: str) -> None:
        if not cond:
            raise ModelFileError(f"{where}: {what}")

    def ints(xs) -> bool:
        return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)

    def nums(xs) -> bool:
        return isinstance(xs, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)

    require(isinstance(d, dict), "not a description")
    for key in ("embedding_graph", "backbone", "check"):
        require(isinstance(d.get(key), dict), f"field {key!r} missing")
    g, b, c = d["embedding_graph"], d["backbone"], d["check"]
    require(isinstance(g.get("input"), dict) and isinstance(g.get("output"), dict), "graph description invalid")
    require(isinstance(b.get("name"), str) and isinstance(b.get("weights"), str), "backbone name/weights invalid")
    require(b.get("weights_setting") is None or isinstance(b.get("weights_setting"), str), "weights setting invalid")
    require(ints(b.get("stages")) and ints(b.get("stage_channels")) and ints(b.get("stage_strides"))
            and len(b["stages"]) == len(b["stage_channels"]) == len(b["stage_strides"]), "backbone stages invalid")
    norm = g["input"].get("normalisation")
    require(isinstance(norm, dict) and nums(norm.get("mean")) and nums(norm.get("std")), "normalisation invalid")
    shape, out = g["input"].get("shape"), g["output"].get("shape")
    require(isinstance(shape, list) and len(shape) == 4 and ints(shape[1:]), "input shape invalid")
    require(isinstance(out, list) and len(out) == 4 and ints(out[1:]), "output shape invalid")
    require(ints(c.get("sample_index")) and nums(c.get("sample_values"))
            and len(c["sample_index"]) == len(c["sample_values"])
            and isinstance(c.get("range"), (int, float)) and not isinstance(c.get("range"), bool),
            "check values invalid")
    return d


def backbone_info(d: dict) -> BackboneInfo:
    """The backbone a (checked) description describes, without loading it."""
    b, g = d["backbone"], d["embedding_graph"]["input"]
    try:
        spec = BackboneSpec(b["name"], tuple(b["stages"]), int(g["shape"][2]), b.get("weights_setting"))
    except ValueError as exc:
        raise ModelFileError(f"backbone description invalid: {exc}") from None
    norm = g["normalisation"]
    return BackboneInfo(spec, b["weights"], tuple(b["stage_channels"]), tuple(b["stage_strides"]),
                        tuple(float(x) for x in norm["mean"]), tuple(float(x) for x in norm["std"]))


def read_graph_description(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is damaged ({str(exc)[:120]})") from None
    return check_description(d, path)


def recorded_deviation(runtime: EmbeddingRuntime, d: dict) -> float:
    """Largest deviation, as a share of the range, of the runtime's probe output from the
    values PyTorch gave when the graph was exported."""
    c = d["check"]
    s = int(d["embedding_graph"]["input"]["shape"][2])
    try:
        out = np.asarray(runtime(recorded_probe(d, s)), dtype=np.float32).reshape(-1)
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the graph
        raise RuntimeUnavailable(f"{runtime.name} failed on the probe images ({exc.__class__.__name__}: "
                                 f"{str(exc)[:200]})") from None
    idx = np.asarray(c["sample_index"], dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= out.size):
        return float("inf")
    dev = np.abs(out[idx].astype(np.float64) - np.asarray(c["sample_values"], np.float64))
    return float(dev.max(initial=0.0)) / (float(c["range"]) or 1.0)


def open_checked(graph: Path, d: dict, requested: str, threads: int | None = None
                 ) -> tuple[EmbeddingRuntime | None, list[str]]:
    """Open the first ONNX runtime (``requested`` first, or fastest first for ``auto``) that
    reproduces the recorded probe values; (None, reasons) if none does."""
    names = [n for n in RUNTIMES if n != "torch"]
    order = names if requested == "auto" else [requested] + [n for n in names if n != requested]
    notes = []
    for name in order:
        try:
            _import(name)
            rt = open_runtime(name, graph, threads)
            dev = recorded_deviation(rt, d)
            if not dev <= float(d["check"].get("tolerance", AGREEMENT)):
                raise RuntimeUnavailable(f"{name} disagrees with the values PyTorch gave at export "
                                         f"({dev:.2e} of the range)")
            return rt, notes
        except RuntimeUnavailable as exc:
            notes.append(f"{name}: {exc}")
            log.warning("embedding runtime %s not used: %s", name, exc)
    return None, notes


def dumps(d: dict) -> str:
    """Indented JSON with lists of numbers and strings kept on one line."""
    text = json.dumps(d, indent=1)
    return re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]"
                  if m.group(1).strip() else "[]", text)


def _graph_names(key: str, model_path: str | os.PathLike[str] | None) -> tuple[Path | None, Path]:
    sibling = None if model_path is None else Path(f"{Path(model_path)}.embed-{key}.onnx")
    return sibling, cache_dir() / f"embed-{key}.onnx"


def _complete(graph: Path | None) -> bool:
    return graph is not None and graph.is_file() and graph.stat().st_size > 0 and description_path(graph).is_file()


def _copy_graph(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((src, dst), (description_path(src), description_path(dst))):
        tmp = b.with_name(f".{b.name}.tmp")
        try:
            shutil.copyfile(a, tmp)
            os.replace(tmp, b)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave a half copy behind
            raise


def _as_input(batch) -> np.ndarray:
    """A numpy array, or a CPU torch tensor (viewed through ``__array__``), as contiguous float32."""
    return np.ascontiguousarray(np.asarray(batch, dtype=np.float32))


class OnnxRuntimeEmbedding:
    """ONNX Runtime, CPU execution provider, sequential, ``threads`` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, graph: str | os.PathLike[str], threads: int | None = None) -> None:
        ort = _import("onnxruntime")
        self.graph, self.threads = Path(graph), threads or num_threads()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # no busy-waiting between calls: the decode thread and the GUI share these cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(self.graph), so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: _as_input(batch)})[0]
        return np.ascontiguousarray(out, dtype=np.float32)


class OpenVinoEmbedding:
    """OpenVINO on the CPU, float32 inference precision, latency hint, one stream.

    An infer request is not thread-safe: each thread gets its own (the GUI's engine thread
    and a live thread may share one detector's runtime).
    """

    name = "openvino"

    def __init__(self, graph: str | os.PathLike[str], threads: int | None = None) -> None:
        ov = _import("openvino")
        self.graph, self.threads = Path(graph), threads or num_threads()
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32",  # never bf16/f16: same answers as PyTorch
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self._compiled = core.compile_model(core.read_model(str(self.graph)), "CPU", config)
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self._compiled.create_infer_request()
        out = req.infer({0: _as_input(batch)}, share_inputs=True, share_outputs=False)
        return np.ascontiguousarray(out[0], dtype=np.float32)


def open_runtime(name: str, graph: str | os.PathLike[str], threads: int | None = None) -> EmbeddingRuntime:
    """An ONNX runtime by name over an exported graph (raises :class:`RuntimeUnavailable`)."""
    cls = {"onnxruntime": OnnxRuntimeEmbedding, "openvino": OpenVinoEmbedding}.get(name)
    if cls is None:
        raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    try:
        return cls(graph, threads)
    except RuntimeUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged graph, an unsupported CPU, a runtime bug
        raise RuntimeUnavailable(f"{name} cannot run {Path(graph).name} ({exc.__class__.__name__}: "
                                 f"{str(exc)[:200]})") from None



#: the probe batch's definition: 2 = :func:`probe_batch` (numpy, float64 then rounded);
#: descriptions without ``check.probe_version`` were recorded on the first one, computed by
#: PyTorch in float32 (:func:`core.runtime.legacy_probe_batch`)
PROBE_VERSION = 2


def probe_batch(image_size: int, n: int = 2) -> np.ndarray:
    """A deterministic (n, 3, S, S) float32 batch in [0, 1] with structure at every scale: the
    images a runtime's output is checked on against the values PyTorch gave at export.

    Computed in float64 by numpy and rounded once, so the same bits on every machine and with
    or without PyTorch. The first probe was computed by PyTorch in float32: its ``linspace``
    differs in the last bit with the CPU's vector width, and the wrap of the green ramp
    (``% 1``) turned such a bit into a jump of 1.0 at a few pixels, 1.6e-2 of the
    embedding's range, far above the tolerance (measured: numpy's float32 version of it).
    """
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float64)
    yy, xx = np.meshgrid(ramp, ramp, indexing="ij")
    imgs = []
    for i in range(n):
        f = 3.0 + 4.0 * i
        r = 0.5 + 0.5 * np.sin(f * 6.28 * xx) * np.cos(f * 3.14 * yy)
        g = (xx * (1 + i) + yy) % 1.0
        b = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1 * (i + 1)).astype(np.float64)
        imgs.append(np.stack([r, g, b]))
    return np.ascontiguousarray(np.stack(imgs), dtype=np.float32)


def probe_version(d: dict) -> int:
    """The probe batch a description's check values were recorded on (1: the first one)."""
    v = d["check"].get("probe_version", 1)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def recorded_probe(d: dict, image_size: int) -> np.ndarray:
    """The probe batch the description's values were recorded on. The first one needs
    PyTorch (it is imported here only for such a graph; inspection without PyTorch does not
    take graphs recorded on it, see core.lean_inspection)."""
    v = probe_version(d)
    if v == PROBE_VERSION:
        return probe_batch(image_size)
    if v == 1:
        from .runtime import legacy_probe_batch

        return legacy_probe_batch(image_size).numpy()
    raise RuntimeUnavailable(f"the graph's check values were recorded on probe version {v}, unknown here")
