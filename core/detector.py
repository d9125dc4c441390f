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

import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .backbone import BackboneInfo, FeatureExtractor
from .config import (  # noqa: F401 - the settings, re-exported where they always were
    MAX_BATCH_SIZE, MAX_CALIBRATION_FRACTION, MAX_FALSE_ALARM_RATE, MAX_SEED, MAX_SIGMA, DetectorConfig,
    _check_model_params, check_range,
)
from .embedding import Embedder, choose_channels
from .errors import BackboneUnavailableError, NotFittedError, OkngError, ResourceError
from .feedback_memory import FeedbackMemory
from .inspection import Inspection, judge, maps_and_scores
from .models import TRAINED_KINDS, NormalityModel, model_class
from .thresholds import Thresholds

if TYPE_CHECKING:
    from .tiling import TileStitcher

log = logging.getLogger(__name__)


def estimate_fit_memory(config: DetectorConfig, grid: tuple[int, int], n_channels: int,
                        n_images: int | None = None) -> tuple[float, str]:
    """(bytes, what dominates) a fit needs at its peak, roughly: the model's float64
    statistics and float32 precisions, stored embeddings for models that keep them, the
    held-out embeddings, one batch through the backbone and the statistics update."""
    p, c = grid[0] * grid[1], n_channels
    n = n_images or 0
    params = config.model_params
    kind = config.model
    gauss = lambda k: p * k * k * 8.0 + p * k * (k + 1) / 2 * 4.0 + p * k * 8.0  # noqa: E731
    if kind == "padim-lowrank":
        k = min(int(params.get("rank", 100)), c)
        state, what = gauss(k) + p * c * 8.0, f"{p} patches x {k}x{k} covariances (float64)"
    elif kind == "padim-kmeans":
        k = int(params.get("components", 3))
        state = k * gauss(c) + 2 * n * p * c * 4.0
        what = f"{p} patches x {k} components x {c}x{c} covariances (float64) + {n} stored embeddings"
    elif kind in TRAINED_KINDS:  # the OK embeddings are kept (float16) for the epochs
        # + a training batch's activations: ~10 maps of `width` channels per layer pass (five
        # layers forward, their gradients back), float32
        acts = int(params.get("batch", 8)) * int(params.get("width", 64)) * p * 4.0 * 10
        state, what = n * p * c * 2.0 + acts, f"{n} images x {p} patches x {c} channels kept for training"
    elif kind == "patchcore":
        state, what = 2 * n * p * c * 4.0, f"{n} images x {p} patches x {c} channels of memory bank"
    else:
        state, what = gauss(c), f"{p} patches x {c}x{c} covariances (float64)"
    n_cal = int(round(n * config.calibration_fraction)) if n >= 5 else 0
    held = 0.0 if config.tiled else n_cal * p * c * 2.0  # a tiled fit keeps scores, not embeddings
    s = config.image_size
    # backbone activations (~60 float32 per input pixel at the peak for EfficientNet-Lite0's
    # early stages) + the batch's embedding and its float64 copies in the statistics update
    batch = config.batch_size * (s * s * 4.0 * 60 + p * c * 8.0 * 3)
    what = f"{_gb(state)} for {what}, {_gb(batch)} for a batch of {config.batch_size} through the backbone"
    return state + held + batch, what


def available_memory() -> float | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                room = float(limit) - float(f.read().strip())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            import psutil

            avail = float(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - no psutil, unknown platform: no check
            return None
    return avail


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e8 else f"{b / 1e6:.0f} MB"


def check_memory(config: DetectorConfig, grid: tuple[int, int], n_channels: int, n_images: int | None = None,
                 stage_channels: tuple[int, ...] | None = None) -> None:
    """Refuse, with the reason, a fit that would need more memory than is available."""
    need, what = estimate_fit_memory(config, grid, n_channels, n_images)
    avail = available_memory()
    if avail is None or need <= avail:
        return
    ratio = grid[0] / max(config.image_size, 1)  # patches per pixel
    fit = None
    for size in range(config.image_size - 32, 31, -32):
        g = max(1, math.ceil(size * ratio))
        if estimate_fit_memory(config.with_(image_size=size, topk=1), (g, g), n_channels, n_images)[0] <= 0.8 * avail:
            fit = size
            break
    hint = f"use --image-size {fit} or less, or fewer --channels" if fit else "use fewer --channels"
    raise ResourceError(
        f"this fit needs about {_gb(need)} of memory at image size {config.image_size} ({what}) but "
        f"{_gb(avail)} is available: {hint} (or keep --image-size and inspect large images as tiles: --tile)")


def preprocess(images: list[np.ndarray], size: int, contrast: str | None = None) -> torch.Tensor:
    """RGB uint8 images of any size -> (B, 3, size, size) float32 in [0, 1]
    (:func:`core.imageio.network_input`, as a tensor viewing it)."""
    from .imageio import network_input

    return torch.from_numpy(network_input(images, size, contrast))


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
        #: the held-out images' paths (absolute), in calibration order; a
        #: refit holds them out again (:func:`core.jobs.split_calibration`); saved in the
        #: model file; () when unknown (a model saved before they were kept)
        self.calibration_paths: tuple[str, ...] = ()
        #: ids of the stored operator labels this model has learnt, in order (see
        #: :mod:`core.session_labels`); saved in the model file
        self.applied_labels: tuple[int, ...] = ()
        #: what channel reweighting learnt from those labels (``fa_shares`` (N, C),
        #: ``defect_shares`` (M, C), ``defect_embeddings`` (K, C, h, w) float16; see
        #: :class:`core.feedback.FeedbackLearner`), saved in the model file so that labels
        #: made after reopening reweight as they would have in the session; None: nothing
        self.feedback_evidence: dict[str, torch.Tensor] | None = None
        #: the model file this detector was loaded from or saved to (its embedding graph is
        #: cached beside it), or None
        self.model_path: str | None = None
        #: what runs the embedding at inspection (see :meth:`use_runtime`); None: PyTorch
        self._runtime = None
        #: why the requested runtime is not the one running (one line per runtime skipped)
        self.runtime_notes: list[str] = []

        #: position-free memory of accepted appearances (false-alarm feedback, issue 11);
        #: applied to every score, so inspection, calibration, CLI and simulation all see it
        self.memory: FeedbackMemory | None = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, config: DetectorConfig, extractor: FeatureExtractor | None = None,
               n_images: int | None = None) -> Detector:
        """An unfitted detector. Pass ``extractor`` to share an already loaded backbone.

        Refuses (before allocating the model) a channel count the backbone's stages do not
        have, model parameters that do not fit those channels, and a fit whose estimated
        memory (:func:`estimate_fit_memory`; ``n_images`` refines it) exceeds what is free.
        """
        if not isinstance(extractor, FeatureExtractor) or extractor.spec != config.backbone_spec():
            extractor = FeatureExtractor(config.backbone_spec())
        total = sum(extractor.stage_channels)
        if config.n_channels is not None and config.n_channels > total:
            raise ValueError(
                f"n_channels (--channels) is {config.n_channels} but stages {list(config.stages)} of "
                f"{config.backbone} have {total} channels: choose 1 to {total}, or 0 for all of them")
        idx = choose_channels(total, config.n_channels, config.seed)
        probe = Embedder(extractor, idx)
        _check_model_params(config.model, model_class(config.model), config.model_params, probe.n_channels)
        check_memory(config, probe.grid_size, probe.n_channels, n_images, extractor.stage_channels)
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
        det.calibration_paths = self.calibration_paths
        det.applied_labels = self.applied_labels
        det.feedback_evidence = self.feedback_evidence  # replaced, never modified in place
        det.memory = None if self.memory is None else self.memory.copy()
        det.model_path, det._runtime, det.runtime_notes = self.model_path, self._runtime, list(self.runtime_notes)
        return det

    def ensure_memory(self, **params: Any) -> FeedbackMemory:
        """The detector's feedback memory, created (empty, with ``params``) if it has none."""
        if self.memory is None:
            params.setdefault("channel_groups", self.embedder.channel_stage.tolist())
            self.memory = FeedbackMemory(self.model.grid, self.model.n_channels, **params)
        return self.memory

    # -- data flow ----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.image_size

    def warm_up(self, feedback: bool = False) -> None:
        """Load the compiled scoring kernel now (from numba's cache: ~1 s; first compile ~3 s)
        instead of inside the first inspection. Models that do not use it: no-op. With
        ``feedback`` (a station where clicks follow) the feedback memory's search too, not in
        the operator's first click (0.5 s from the cache, 4 s on a fresh install:
        benchmarks/bench_feedback.py --timing); tiled models take no clicks."""
        if self.model.uses_mahalanobis:
            from .models.mahalanobis import warm_up

            warm_up()
        if feedback and not self.config.tiled:
            from .feedback_memory import warm_up as warm_up_memory

            warm_up_memory()

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

    def embed(self, images: list[np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """RGB uint8 images (or a preprocessed batch) -> (B, C, h, w) float32 embeddings.

        Runs on the runtime chosen by :meth:`use_runtime` (PyTorch until then); the result is
        the same whichever runs it (to ~1e-6 of its range)."""
        batch = self._network_input(images)
        rt = self._runtime
        if rt is not None:
            try:
                return torch.as_tensor(rt(batch))  # numpy from the ONNX runtimes: a view, no copy
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

    def embed_torch(self, images: list[np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """:meth:`embed` with PyTorch whatever the runtime (fitting, reference checks)."""
        return self.embedder(self._network_input(images))

    def _network_input(self, images: list[np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """A preprocessed batch (tensor, or the (B, 3, S, S) float32 array the decode thread
        makes: viewed, not copied) or RGB uint8 images (preprocessed here)."""
        if isinstance(images, torch.Tensor):
            return images
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.float32:
            return torch.from_numpy(images)
        return preprocess(images, self.image_size, self.config.contrast)

    def fit_embeddings(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        self.model.partial_fit(emb, patch_mask)

    def finalize(self) -> None:
        if self.model.n_samples < 1:
            raise NotFittedError("no OK images were fitted: add OK images and fit first")
        self.model.finalize()

    def distances(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) patch distances under the model and its feedback memory."""
        if self.model.n_samples < 1:
            raise NotFittedError("the model is not fitted yet: fit it on OK images first")
        with torch.inference_mode():
            return self.with_memory(emb, self.model.score(emb))

    def with_memory(self, emb: torch.Tensor, model_distances: torch.Tensor) -> torch.Tensor:
        """The model's patch distances (B, h, w) of ``emb`` with the feedback memory applied."""
        if self.memory is None or not len(self.memory):
            return model_distances
        # patches well under the decision level cannot make a part NG: not looked up
        th = self.thresholds
        level = None if th is None else (min(th.pixel, th.image) if self.post.pooling == "topk" else th.pixel)
        # with the PyTorch runtime its CNN keeps PyTorch's threads awake (spinning): the look-up's
        # product uses them. With another runtime they sleep, and waking them would leave them
        # spinning on the cores the next image needs: the look-up splits its search over two
        # cores with a worker of its own instead (FeedbackMemory._search)
        from .graph_runtime import num_threads

        with torch.inference_mode():
            if self._runtime is None:
                return self.memory.apply(emb, model_distances, level, torch.get_num_threads())
            return self.memory.apply(emb, model_distances, level, 1, pipeline=num_threads() >= 2)

    def maps_and_scores(self, emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, h, w) -> ((B, S, S) float32 maps, (B,) float64 image scores)."""
        return maps_and_scores(self.distances(emb), self.post, self.image_size, self.thresholds)

    # -- tiled inspection (core.tiling) ---------------------------------------------------
    def stitch(self, image: np.ndarray, check_cancel: Callable[[], None] | None = None) -> TileStitcher:
        """Every tile of an RGB uint8 image through the model, ``batch_size`` tiles at a time,
        stitched (a tiled detector only). Raises :class:`~core.tiling.TilingError` for an image
        smaller than a tile."""
        from .tiling import plan_tiles, stitch_tiles

        grid = plan_tiles(image.shape[0], image.shape[1], self.config.tile, self.config.tile_overlap)
        return stitch_tiles(image, grid, self.image_size, self.config.batch_size, self.embedder.grid_size,
                            lambda batch: self.distances(self.embed(batch)), check_cancel)

    def map_and_score(self, stitcher: TileStitcher) -> tuple[np.ndarray, float]:
        """The stitched (H, W) anomaly map at the image's own resolution and its image score."""
        from .tiling import topk_mean

        anomaly_map = stitcher.anomaly_map(self.post.sigma)
        if self.post.pooling == "topk":
            return anomaly_map, topk_mean(anomaly_map, min(self.post.topk, anomaly_map.size))
        pixel = self.thresholds.pixel if self.thresholds else None
        return anomaly_map, float(self.post.scores(anomaly_map[None], pixel)[0])

    def inspect_tiled(self, image: np.ndarray, check_cancel: Callable[[], None] | None = None) -> Inspection:
        """Score one image tile by tile; the anomaly map has the image's own resolution."""
        anomaly_map, score = self.map_and_score(self.stitch(image, check_cancel))
        return self.judge(score, anomaly_map)

    def require_whole_images(self, what: str) -> None:
        """Refuse ``what`` (a feature built on one embedding per image) for a tiled detector."""
        if self.config.tiled:
            raise OkngError(f"{what} is not available for tiled models yet (this model inspects "
                            f"{self.config.tile}-pixel tiles); refit without --tile to use it")

    def judge(self, score: float, anomaly_map: np.ndarray) -> Inspection:
        return judge(score, anomaly_map, self.thresholds)

    def inspect_embeddings(self, emb: torch.Tensor) -> list[Inspection]:
        maps, scores = self.maps_and_scores(emb)
        return [self.judge(s, m) for s, m in zip(scores, maps)]

    def inspect(self, images: list[np.ndarray]) -> list[Inspection]:
        """Score RGB uint8 images (any size) and judge them against the thresholds (tile by
        tile, one image at a time, for a tiled detector)."""
        if self.config.tiled:
            return [self.inspect_tiled(img) for img in images]
        return self.inspect_embeddings(self.embed(images))

    def calibrate_on(self, held_out: torch.Tensor, false_alarm_rate: float | None = None) -> None:
        """Set the thresholds from held-out OK embeddings (N, C, h, w) and keep them."""
        self.calibration_embeddings = held_out.to(torch.float16)
        self.recalibrate(false_alarm_rate)

    def calibration_model_distances(self, chunk: int = 16) -> torch.Tensor:
        """(N, h, w) the model's own patch distances of the held-out OK images (no memory)."""
        held = self.calibration_embeddings
        if held is None or held.shape[0] == 0:
            return torch.zeros(0, *self.model.grid)
        with torch.inference_mode():
            return torch.cat([self.model.score(held[i : i + chunk].to(torch.float32))
                              for i in range(0, held.shape[0], chunk)])

    def calibration_scores(self, chunk: int = 16,
                           model_distances: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image scores, map peaks) of the held-out OK images under the current model.
        ``model_distances``: :meth:`calibration_model_distances` of this very model, when the
        caller knows they still hold (a feedback click that changed only the memory): then
        only the memory and the post-processing run again, not the model."""
        held = self.calibration_embeddings
        if held is None or held.shape[0] == 0:
            return np.zeros(0), np.zeros(0)
        if model_distances is not None and tuple(model_distances.shape) != (held.shape[0], *self.model.grid):
            raise ValueError(f"model distances {tuple(model_distances.shape)} are not those of the "
                             f"{held.shape[0]} held-out images on a {self.model.grid} grid")
        scores, peaks = [], []
        for i in range(0, held.shape[0], chunk):
            emb = held[i : i + chunk].to(torch.float32)
            if model_distances is None:
                maps, s = self.maps_and_scores(emb)
            else:
                dist = self.with_memory(emb, model_distances[i : i + chunk])
                maps, s = maps_and_scores(dist, self.post, self.image_size, self.thresholds)
            scores.append(s)
            peaks.append(maps.reshape(len(maps), -1).max(axis=1))
        return np.concatenate(scores), np.concatenate(peaks)

    def recalibrate(self, false_alarm_rate: float | None = None) -> None:
        """Re-derive both thresholds at the target false-alarm rate for the current model.

        Blob pooling needs a pixel level to score, so it is calibrated in two passes.
        """
        from .thresholds import calibrate

        far = false_alarm_rate if false_alarm_rate is not None else (
            self.thresholds.target_false_alarm_rate if self.thresholds else self.config.false_alarm_rate)
        th = self.thresholds
        if self.config.tiled and th is not None and th.calibration_scores.size and self.config.pooling != "blob":
            # A tiled model keeps its held-out images' scores, not every tile's features (that
            # would grow with the image size); the model does not change after its fit (no
            # feedback on tiles yet), so those scores are still the current model's.
            self.thresholds = calibrate(th.calibration_scores, th.calibration_peaks, far)
            return
        if self.calibration_embeddings is None or self.calibration_embeddings.shape[0] == 0:
            return
        for _ in range(2 if self.config.pooling == "blob" else 1):
            self.thresholds = calibrate(*self.calibration_scores(), far)

    def refresh_calibration(self, model_distances: torch.Tensor | None = None) -> None:
        """Keep the thresholds; re-score the held-out OK images so the expected false-alarm
        rate shown for them is true for the current model (after feedback).
        ``model_distances``: as for :meth:`calibration_scores`."""
        if self.thresholds is None or self.calibration_embeddings is None:
            return
        scores, peaks = self.calibration_scores(model_distances=model_distances)
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
