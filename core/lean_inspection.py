"""Inspection without PyTorch: a PaDiM model file (or an exported bundle) and its ONNX graph -> verdicts.

``okng score`` on ONNX Runtime or OpenVINO spent about two seconds of its start-up importing
PyTorch (and SciPy, sympy and more with it) although the exported graph runs the backbone and
what follows the embedding needs numpy, OpenCV and the compiled kernel only. When a model can
be scored that way, :func:`load_lean` builds a :class:`LeanDetector` from

- the model file, read and verified as always (:func:`core.model_file.read_checked`: the
  checksum, the description, the settings' types and ranges; numpy arrays);
- what the model derived from its statistics, cached beside it (:mod:`core.derived_cache`:
  PaDiM's float32 means and packed precisions, tied to the model file's SHA-256);
- the embedding graph cached beside it (or in the user cache) and its description, or a
  bundle's graph (:mod:`core.bundle`), opened with :func:`core.graph_runtime.open_checked`:
  the runtime must reproduce PyTorch's recorded probe values, as on every other path.

It scores with the same pieces as :class:`~core.detector.Detector`: the same network input
(:func:`core.imageio.network_input`), graph, compiled Mahalanobis loop
(:func:`core.models.mahalanobis.padim_distances`), maps, pooling and verdicts
(:mod:`core.inspection`), so the scores are the detector's on the same runtime
(``tests/core/test_lean_inspection.py``).

:func:`load_lean` returns None (the caller loads the full detector) for anything else: the
``torch`` runtime, models other than ``padim``, a model with feedback memory entries (its
look-up is PyTorch code), a format-1 file (no checksum, so no derived cache), no cached
graph or derived state yet (the first full load writes both), or no ONNX runtime that passes
the check. Nothing here imports torch or timm.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import derived_cache
from .anomaly_map import PostProcess
from .backbone_spec import BackboneSpec
from .config import DetectorConfig, check_config_types
from .errors import ModelFileError
from .graph_runtime import (
    PROBE_VERSION, EmbeddingRuntime, _complete, _graph_names, backbone_info, default_runtime, description_path,
    graph_key_for, open_checked, probe_version, read_graph_description,
)
from .imageio import network_input
from .inspection import Inspection, judge, maps_and_scores
from .model_file import all_finite, peek, read_checked
from .models.mahalanobis import packed_size, padim_distances
from .models.neighbourhood import neighbourhood_mean
from .thresholds import Thresholds

log = logging.getLogger(__name__)

#: the models this module scores (their derived state is what :func:`patch_distances` reads)
LEAN_MODELS = ("padim",)


@dataclasses.dataclass(frozen=True)
class InspectionSettings:
    """The recipe settings inspection reads (``det.config`` for :func:`core.jobs.inspect_job`)."""

    image_size: int
    batch_size: int
    bit_depth: int | None
    spec: BackboneSpec
    post: PostProcess
    contrast: str | None = None  # the grey-level rule before the network (DetectorConfig.contrast)
    #: always whole images: a tiled model is scored by the full detector (see :func:`_unsupported`)
    tile: None = None
    tile_overlap: None = None

    @property
    def tiled(self) -> bool:
        return False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: object) -> InspectionSettings:
        """From a model file's (type-checked) settings, with :class:`DetectorConfig`'s own range
        checks; the model's parameters are not checked: the model is not built, only its
        derived arrays are read."""
        probe = DetectorConfig.defaults()
        probe.__dict__.update(cfg)
        try:
            DetectorConfig.validate(probe)  # reads attributes only: the same checks, no model import
            spec = BackboneSpec(probe.backbone, tuple(probe.stages), probe.image_size, probe.weights)
            post = PostProcess(sigma=probe.sigma, pooling=probe.pooling, topk=probe.topk)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{where}: invalid settings in the model file ({exc})") from None
        return cls(probe.image_size, probe.batch_size, probe.bit_depth, spec, post, probe.contrast)


def patch_distances(emb: np.ndarray, mean: np.ndarray, precision: np.ndarray,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """PaDiM's distances on numpy arrays: :func:`core.models.mahalanobis.padim_distances`,
    or the same arithmetic in numpy when the compiled loop is unavailable (slower)."""
    d = padim_distances(emb, mean, precision, weights)
    if d is not None:
        return d
    b, c, h, w = emb.shape
    x = np.ascontiguousarray(emb.reshape(b, c, h * w).transpose(2, 0, 1), dtype=np.float32)
    if weights is not None:
        x, mean = x * weights, mean * weights
    d2 = _squared_numpy(x, mean, precision)
    return np.sqrt(np.maximum(d2, 0.0)).T.reshape(b, h, w)


def _squared_numpy(x: np.ndarray, mean: np.ndarray, packed: np.ndarray) -> np.ndarray:
    c = x.shape[-1]
    rows, cols = np.triu_indices(c)
    full = np.empty((packed.shape[0], c, c), np.float32)
    full[:, rows, cols] = packed
    full[:, cols, rows] = packed
    diff = x - mean[:, None, :]
    return np.einsum("pbc,pcd,pbd->pb", diff, full, diff).astype(np.float32)


class LeanDetector:
    """What ``okng score`` needs of a :class:`~core.detector.Detector`, without PyTorch: embed
    (the exported graph), score (PaDiM's derived state), judge. Built by :func:`load_lean`.

    If the runtime fails mid-run, ``fallback`` (when given) loads the full detector once and
    it takes over, as the detector itself falls back to PyTorch; without one the error stands.
    """

    def __init__(self, settings: InspectionSettings, mean: np.ndarray, precision: np.ndarray,
                 weights: np.ndarray | None, thresholds: Thresholds | None, runtime: EmbeddingRuntime,
                 notes: list[str], model_path: str, fallback: Callable[[], Any] | None = None,
                 neighbourhood: int = 1) -> None:
        self.config = settings
        #: PaDiM's ``neighbourhood``: the features its Gaussians describe are patch means
        self.neighbourhood = int(neighbourhood)
        self.post = settings.post
        self.mean, self.precision, self.weights = mean, precision, weights
        self.thresholds = thresholds
        self._runtime = runtime
        self.runtime_notes = notes
        self.model_path = model_path
        self._fallback = fallback
        self._full = None  # the full detector, once a failed runtime handed over to it

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def runtime_name(self) -> str:
        return self._runtime.name if self._full is None else self._full.runtime_name

    def warm_up(self) -> None:
        from .models.mahalanobis import warm_up

        warm_up()

    def embed(self, images: list[np.ndarray] | np.ndarray):
        """RGB uint8 images, or the decode thread's (B, 3, S, S) float32 batch -> (B, C, h, w)."""
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.float32:
            batch = images
        else:
            batch = network_input(images, self.image_size, self.config.contrast)
        if self._full is None:
            try:
                return self._runtime(batch)
            except Exception as exc:  # noqa: BLE001 - the full detector takes over, if there is one
                if self._fallback is None:
                    raise
                note = f"{self._runtime.name} failed ({exc.__class__.__name__}: {str(exc)[:160]}); " \
                       "loading the full detector"
                log.warning("embedding runtime %s", note)
                self.runtime_notes.append(note)
                self._full = self._fallback()
        return self._full.embed(batch)

    def maps_and_scores(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats = neighbourhood_mean(np.asarray(emb, dtype=np.float32), self.neighbourhood)
        dist = patch_distances(feats, self.mean, self.precision, self.weights)
        return maps_and_scores(dist, self.post, self.image_size, self.thresholds)

    def inspect_embeddings(self, emb) -> list[Inspection]:
        if self._full is not None:
            return self._full.inspect_embeddings(emb)
        maps, scores = self.maps_and_scores(emb)
        return [judge(s, m, self.thresholds) for s, m in zip(scores, maps)]

    def inspect(self, images: list[np.ndarray]) -> list[Inspection]:
        return self.inspect_embeddings(self.embed(images))


def load_lean(path: str | os.PathLike[str], runtime: str | None = None,
              fallback: Callable[[], Any] | None = None) -> LeanDetector | None:
    """A model file or exported bundle ready to score without PyTorch on ``runtime`` (None:
    ``OKNG_RUNTIME`` or auto), or None when that is not possible here (see the module
    docstring; the reason is logged). A damaged model file or bundle raises
    :class:`ModelFileError` as the full load would."""
    from .bundle import MODEL_FILE, bundle_runtime, checked_graph, is_bundle

    path = Path(path)
    requested = (runtime or default_runtime()).lower()
    if requested == "torch":
        return None
    bundle = None
    if is_bundle(path):
        requested = bundle_runtime(path, runtime)
        bundle, graph = checked_graph(path)
        model_path = path / str(bundle.get("model_file", MODEL_FILE))
    else:
        model_path = path
    why = _unsupported_at_a_glance(model_path)
    if why:  # told by the header: the full load reads the file, not both loads
        log.info("%s: scoring with the full detector (%s)", path, why)
        return None
    meta, arrays, digest = read_checked(model_path, check_config_types)
    why = _unsupported(meta, arrays, digest)
    if why:
        log.info("%s: scoring with the full detector (%s)", path, why)
        return None
    settings = InspectionSettings.from_config(meta["config"], model_path)
    n_channels, grid = int(meta["model"]["n_channels"]), tuple(meta["model"]["grid"])
    derived = _derived(model_path, digest, grid, n_channels)
    if derived is None:
        log.info("%s: no derived state cached yet; scoring with the full detector", model_path)
        return None
    if bundle is None:
        found = _cached_graph(model_path, settings.spec, str(meta["backbone"]["weights"]),
                              arrays["embedding.channel_idx"])
        if found is None:
            log.info("%s: no embedding graph cached yet; scoring with the full detector", model_path)
            return None
        graph, desc = found
    else:
        desc = bundle
        if backbone_info(desc).spec != settings.spec or probe_version(desc) != PROBE_VERSION:
            return None  # (a bundle checked on the first probe batch needs PyTorch to compute it)
    if tuple(desc["embedding_graph"]["output"]["shape"][1:]) != (n_channels, *grid):
        raise ModelFileError(f"{path}: the graph's output does not match the model")
    rt, notes = open_checked(graph, desc, requested)
    if rt is None:
        return None  # the full load says why (or falls back to PyTorch)
    th = meta.get("thresholds")
    calibration = [arrays.get(f"thresholds.calibration_{k}", np.zeros(0)) for k in ("scores", "peaks")]
    if not all(a.ndim == 1 and np.issubdtype(a.dtype, np.floating) for a in calibration):
        raise ModelFileError(f"{model_path}: threshold calibration scores invalid")
    thresholds = None if th is None else Thresholds(
        float(th["image"]), float(th["pixel"]), *calibration, float(th["target_false_alarm_rate"]))
    weights = arrays.get("model_weights.channels")
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(n_channels)
    return LeanDetector(settings, derived["mean"], derived["precision"], weights, thresholds, rt, notes,
                        str(model_path), fallback, _neighbourhood(meta) or 1)


def _unsupported_at_a_glance(model_path: Path) -> str:
    """What the header alone says against scoring without PyTorch: another model, tiles, a
    feedback memory ("" when it says nothing against it, or cannot be read)."""
    seen = peek(model_path)
    if seen is None:
        return ""
    meta, shapes = seen
    model, config = meta.get("model"), meta.get("config")
    if isinstance(model, dict) and model.get("kind") not in LEAN_MODELS:
        return f"model {model.get('kind')!r}"
    if isinstance(config, dict) and config.get("tile") is not None:
        return "it inspects tiles (core.tiling)"
    if (shapes.get("feedback_memory.blocks") or [0])[0] > 0:
        return "its feedback memory is applied with PyTorch"
    return ""


def _unsupported(meta: dict[str, Any], arrays: dict[str, np.ndarray], digest: str | None) -> str:
    """Why this model file cannot be scored here without PyTorch ("" if it can)."""
    kind = meta["model"]["kind"]
    if kind not in LEAN_MODELS:
        return f"model {kind!r}"
    if digest is None:
        return "a format-1 file (no checksum, no derived state)"
    if meta.get("config", {}).get("tile") is not None:
        return "it inspects tiles (core.tiling)"
    blocks = arrays.get("feedback_memory.blocks")
    if blocks is not None and blocks.shape[0] > 0:
        return "its feedback memory is applied with PyTorch"
    if _neighbourhood(meta) is None:
        return "model parameters invalid"
    idx = arrays.get("embedding.channel_idx")
    if idx is None or idx.ndim != 1 or idx.size != meta["model"]["n_channels"]:
        return "channel indices missing"
    weights = arrays.get("model_weights.channels")
    if weights is not None and (weights.size != meta["model"]["n_channels"] or not all_finite(weights)):
        return "channel weights invalid"
    return ""


def _neighbourhood(meta: dict[str, Any]) -> int | None:
    """PaDiM's ``neighbourhood`` from the file's parameters (1 when a file predates it); None
    when it is not a sound one (the full load then says what is wrong)."""
    params = meta["model"].get("params", {})
    n = params.get("neighbourhood", 1) if isinstance(params, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 15 or n % 2 == 0:
        return None
    return n


def _derived(model_path: Path, digest: str | None, grid: tuple[int, ...], n_channels: int
             ) -> dict[str, np.ndarray] | None:
    """PaDiM's cached float32 means and packed precisions, shapes and values checked."""
    arrays = derived_cache.read_arrays(model_path, digest, "padim")
    if arrays is None:
        return None
    p = int(np.prod(grid))
    shapes = {"mean": (p, n_channels), "precision": (p, packed_size(n_channels))}
    if set(arrays) != set(shapes):
        return None
    for name, shape in shapes.items():
        if arrays[name].shape != shape or not all_finite(arrays[name]):
            return None
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def _cached_graph(model_path: Path, spec: BackboneSpec, weights: str, channel_idx: np.ndarray
                  ) -> tuple[Path, dict] | None:
    """The model's embedding graph and its description, beside the model or in the user cache."""
    key = graph_key_for(spec, weights, channel_idx)
    for graph in _graph_names(key, model_path):
        if not _complete(graph):
            continue
        try:
            d = read_graph_description(description_path(graph))
        except ModelFileError as exc:
            log.info("%s", exc)
            continue
        if d.get("key") == key and backbone_info(d).spec == spec and probe_version(d) == PROBE_VERSION:
            return graph, d
    return None


__all__ = ["LEAN_MODELS", "InspectionSettings", "LeanDetector", "load_lean", "patch_distances"]
