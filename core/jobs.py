"""Long-running work as cancellable generators: fit, inspect, evaluate.

A job is ``job(token) -> Generator[Progress, None, Result]``: each ``yield`` reports progress
and is a cancellation point, so the same function drives a CLI progress bar, a Qt worker
thread and a plain test loop. Images are decoded in a helper thread while the backbone runs
(OpenCV releases the GIL), and unreadable files are reported and skipped.

Example:
    >>> token = CancelToken()
    >>> for progress in (gen := fit_job(paths, DetectorConfig(), token)):
    ...     print(progress.done, progress.total)
    >>> # the generator's return value (StopIteration.value) is a FitResult; or use run_job()
    >>> result = run_job(fit_job(paths, DetectorConfig(), token))
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .allocator import release_free_memory
from .backbone import FeatureExtractor
from .detector import Detector, DetectorConfig, Inspection, preprocess
from .errors import Cancelled, ImageLoadError, NotFittedError
from .imageio import load_image

log = logging.getLogger(__name__)
R = TypeVar("R")


class CancelToken:
    """Thread-safe cancel flag shared by a job and whoever may cancel it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    message: str = ""
    #: optional payload (e.g. one inspected image) for consumers that stream results
    item: Any = None


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class ScoredImage:
    path: str
    inspection: Inspection
    image: np.ndarray | None = None  # the decoded RGB image, when asked for
    seconds: float = 0.0


@dataclass
class FitResult:
    detector: Detector
    fitted: list[str] = field(default_factory=list)
    calibration: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0


def run_job(gen: Generator[Any, None, R], on_progress=None) -> R:
    """Drive a job to completion in this thread; return its result."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(p)


@dataclass
class _Batch:
    paths: list[str]  # readable paths, in input order (rows of ``tensor``)
    tensor: torch.Tensor | None  # (B, 3, S, S) or None if every file failed
    images: list[np.ndarray]
    skipped: list[Skipped]
    #: every input path in order, with its row in ``tensor`` or its Skipped record
    order: list[tuple[str, int | Skipped]]


def _load_batch(paths: list[str], size: int, keep_images: bool, bit_depth: int | None = None) -> _Batch:
    ok_paths, imgs, skipped, order = [], [], [], []
    for p in paths:
        try:
            imgs.append(load_image(p, bit_depth))
            order.append((p, len(ok_paths)))
            ok_paths.append(p)
        except ImageLoadError as exc:
            skipped.append(Skipped(p, exc.reason))
            order.append((p, skipped[-1]))
            log.warning("skipped %s", exc)
    tensor = preprocess(imgs, size) if imgs else None
    return _Batch(ok_paths, tensor, imgs if keep_images else [], skipped, order)


def iter_batches(paths: list[str], size: int, batch_size: int, keep_images: bool = False,
                 bit_depth: int | None = None) -> Iterator[_Batch]:
    """Decode batches one ahead in a helper thread, so decoding overlaps the backbone.
    ``bit_depth``: the 16-bit rule of :func:`core.imageio.load_image` (the detector's setting)."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="okng-decode") as pool:
        pending = pool.submit(_load_batch, chunks[0], size, keep_images, bit_depth)
        for nxt in chunks[1:] + [None]:
            batch = pending.result()
            if nxt is not None:
                pending = pool.submit(_load_batch, nxt, size, keep_images, bit_depth)
            yield batch


def split_calibration(paths: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split: every k-th image is held out to calibrate the thresholds.

    Needs at least 5 images to hold any out; the fit set always keeps the majority.
    """
    n_cal = int(round(len(paths) * fraction)) if len(paths) >= 5 else 0
    if n_cal == 0:
        return list(paths), []
    step = len(paths) / n_cal
    cal_idx = {int(i * step + step / 2) for i in range(n_cal)}
    fit = [p for i, p in enumerate(paths) if i not in cal_idx]
    cal = [p for i, p in enumerate(paths) if i in cal_idx]
    return fit, cal


def fit_job(
    paths: Iterable[str | Path],
    config: DetectorConfig,
    token: CancelToken,
    extractor: FeatureExtractor | None = None,
) -> Generator[Progress, None, FitResult]:
    """Fit a detector on OK images and calibrate its thresholds on a held-out share.

    Memory stays constant in the number of fitted images (statistics are streamed). The
    held-out images stay out of the model, so the stated false-alarm rate is measured on
    unseen OK parts, and stays honest when feedback later changes the model: their
    embeddings are kept (float16) and re-scored after every change.
    """
    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    if not paths:
        raise NotFittedError("no OK images given: add OK images to fit a model")
    yield Progress(0, len(paths), "loading backbone")
    fit_paths, cal_paths = split_calibration(paths, config.calibration_fraction)
    det = Detector.create(config, extractor, n_images=len(paths))
    det.model.check_fit_size(len(fit_paths))  # e.g. more k-means components than images
    # Compiled scoring code now, while the heap is small: loaded at the first score, inside
    # calibration, numba's ~130 MB landed on top of the fit's peak and made the peak vary by
    # ±50 MB between runs (packaging/bench_engine.py).
    det.warm_up()
    result = FitResult(det)
    done = 0
    for batch in iter_batches(fit_paths, det.image_size, config.batch_size, bit_depth=config.bit_depth):
        token.raise_if_cancelled()
        result.skipped += batch.skipped
        if batch.tensor is not None:
            det.fit_embeddings(det.embed(batch.tensor))
            result.fitted += batch.paths
        done += len(batch.paths) + len(batch.skipped)
        yield Progress(done, len(paths), f"fitting: {done}/{len(paths)} images")
    if not result.fitted:
        raise NotFittedError(f"none of the {len(fit_paths)} OK images could be read")
    # The held-out images are embedded before finalize, so their backbone passes do not
    # stack on the model's derived tensors (precisions): the peak stays the fit loop's.
    # One preallocated float16 block instead of a list + cat: at 800 images a list of
    # chunks plus the concatenated copy cost ~120 MB of peak RSS (measured), this 25 MB.
    h, w = det.embedder.grid_size
    held = torch.empty((len(cal_paths), det.embedder.n_channels, h, w), dtype=torch.float16)
    n_held = 0
    for batch in iter_batches(cal_paths, det.image_size, config.batch_size, bit_depth=config.bit_depth):
        token.raise_if_cancelled()
        result.skipped += batch.skipped
        if batch.tensor is not None:
            emb = det.embed(batch.tensor)
            held[n_held : n_held + emb.shape[0]] = emb
            n_held += emb.shape[0]
            result.calibration += batch.paths
        done += len(batch.paths) + len(batch.skipped)
        yield Progress(done, len(paths), f"calibrating: {done}/{len(paths)} images")
    yield Progress(done, len(paths), "building the model")  # PatchCore's coreset: a minute
    release_free_memory()  # hand back the loops' freed batch buffers before finalize
    det.finalize()
    if n_held:
        det.calibrate_on(held[:n_held] if n_held < held.shape[0] else held)
    else:
        log.warning("no OK images held out for calibration (fewer than 5 images, or calibration "
                    "fraction 0): set the thresholds by hand")
    result.seconds = time.perf_counter() - t0
    release_free_memory()
    return result


@dataclass(frozen=True)
class InspectSummary:
    scored: int
    skipped: int


def inspect_job(
    paths: Iterable[str | Path],
    detector: Detector,
    token: CancelToken,
    keep_images: bool = False,
    batch_size: int | None = None,
) -> Generator[Progress, None, InspectSummary]:
    """Score images in input order; each Progress carries one ScoredImage or Skipped.

    Results are streamed, never accumulated: a run over 10,000 images holds one batch of
    anomaly maps at a time, and the consumer keeps what it needs (a CSV row, a table row).
    """
    paths = [str(p) for p in paths]
    bs = batch_size or detector.config.batch_size
    done = scored = 0
    for batch in iter_batches(paths, detector.image_size, bs, keep_images=keep_images,
                              bit_depth=detector.config.bit_depth):
        token.raise_if_cancelled()
        t = time.perf_counter()
        results = detector.inspect_embeddings(detector.embed(batch.tensor)) if batch.tensor is not None else []
        per = (time.perf_counter() - t) / max(len(results), 1)
        for p, row in batch.order:
            if isinstance(row, Skipped):
                item: ScoredImage | Skipped = row
            else:
                item = ScoredImage(p, results[row], batch.images[row] if keep_images else None, per)
                scored += 1
            done += 1
            yield Progress(done, len(paths), Path(p).name, item)
    release_free_memory()
    return InspectSummary(scored, done - scored)


def inspect_paths(paths: Iterable[str | Path], detector: Detector,
                  token: CancelToken | None = None) -> list[ScoredImage | Skipped]:
    """Inspect a (small) list of images and return every result, in input order.

    For scripts and tests; long runs should consume :func:`inspect_job`'s stream instead.
    """
    return [p.item for p in inspect_job(paths, detector, token or CancelToken()) if p.item is not None]
