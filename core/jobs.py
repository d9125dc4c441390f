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

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .allocator import release_free_memory
from .errors import Cancelled, ImageLoadError, NotFittedError, OkngError
from .imageio import load_image, network_input

if TYPE_CHECKING:  # PyTorch is imported where a job needs it: scoring from an exported graph never does
    import torch

    from .backbone import FeatureExtractor
    from .detector import Detector, DetectorConfig, Inspection

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
    #: what ``done`` counts: images, or a trained model's epochs (core.models.trained)
    unit: str = "img"


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def none_readable(n: int, skipped: list[Skipped]) -> NotFittedError:
    """The error of a fit none of whose ``n`` OK images could be read, with why (the first
    three reasons): the per-file "skipped" lines of a fit that goes on are never printed."""
    why = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return NotFittedError(f"none of the {n} OK images could be read" + (f" ({why}{more})" if why else ""))


@dataclass(frozen=True)
class ScoredImage:
    path: str
    inspection: Inspection
    image: np.ndarray | None = None  # the decoded RGB image, when asked for
    seconds: float = 0.0
    #: (1, C, h, w) float16 embedding, when asked for: lets a session re-judge this result
    #: under a changed model (feedback) without decoding or running the backbone again
    embedding: torch.Tensor | None = None
    #: SHA-256 of the image file (or of the frame's pixels), when the consumer keeps images:
    #: computed in the decode thread, not on the thread that shows the result
    sha256: str = ""


@dataclass
class FitResult:
    detector: Detector
    fitted: list[str] = field(default_factory=list)
    calibration: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class JobCallbacks:
    """What to call when a submitted job reports; every field optional.

    ``on_item`` gets each :attr:`Progress.item` (a scored image, a skipped file, a captured
    frame) as it streams; ``on_progress`` each :class:`Progress`; exactly one of
    ``on_returned(value)``, ``on_failed(exception)`` or ``on_cancelled()`` ends the job.
    """

    on_returned: Callable[[Any], None] | None = None
    on_failed: Callable[[BaseException], None] | None = None
    on_cancelled: Callable[[], None] | None = None
    on_item: Callable[[Any], None] | None = None
    on_progress: Callable[[Progress], None] | None = None


def drive(job: Callable[[CancelToken], Any], token: CancelToken, report: Callable[[str, Any], None]) -> None:
    """Run ``job(token)`` (a generator function) to its end, reporting each event.

    ``report(kind, payload)`` gets ``started``, ``progress`` (a Progress), ``item`` (its
    payload, or any non-Progress yielded value), and one of ``returned`` (the generator's
    return value), ``failed`` (the exception) or ``cancelled``. Exceptions are reported,
    never swallowed; the generator is always closed so its own ``finally:`` runs.
    """
    if token.cancelled:
        report("cancelled", None)
        return
    report("started", None)
    gen = None
    try:
        gen = job(token)
        while True:
            token.raise_if_cancelled()
            value = next(gen)
            if isinstance(value, Progress):
                report("progress", value)
                if value.item is not None:
                    report("item", value.item)
            else:
                report("item", value)
    except StopIteration as stop:
        report("returned", stop.value)
    except Cancelled:
        log.debug("job cancelled")
        report("cancelled", None)
    except OkngError as exc:  # a refusal in words (a damaged file, no images): one line, no traceback
        log.error("job failed: %s", exc)
        log.debug("where it failed", exc_info=True)  # -v: the traceback of a wrapped cause
        report("failed", exc)
    except Exception as exc:  # reported, never swallowed; a bug keeps its traceback in the log
        log.exception("job failed")
        report("failed", exc)
    finally:
        if gen is not None and hasattr(gen, "close"):
            gen.close()


def deliver(callbacks: JobCallbacks, kind: str, payload: Any) -> None:
    """Route one :func:`drive` event to its callback (failures without one are logged)."""
    if kind == "progress" and callbacks.on_progress:
        callbacks.on_progress(payload)
    elif kind == "item" and callbacks.on_item:
        callbacks.on_item(payload)
    elif kind == "returned" and callbacks.on_returned:
        callbacks.on_returned(payload)
    elif kind == "failed":
        if callbacks.on_failed:
            callbacks.on_failed(payload)
        else:
            log.error("job failed with no handler: %s", payload)
    elif kind == "cancelled" and callbacks.on_cancelled:
        callbacks.on_cancelled()


class InlineExecutor:
    """Runs each submitted job to its end in the caller's thread: scripts, the CLI, tests.

    The same ``submit`` contract as the GUI's engine runner, so an
    :class:`~core.session.InspectionSession` works unchanged without Qt.
    """

    busy = False

    def submit(self, job: Callable[[CancelToken], Any], callbacks: JobCallbacks | None = None,
               replace: bool = False) -> CancelToken:
        token = CancelToken()
        cb = callbacks or JobCallbacks()
        self.busy = True
        try:
            drive(job, token, lambda kind, payload: deliver(cb, kind, payload))
        finally:
            self.busy = False
        return token

    def cancel(self) -> None:
        """Nothing runs in the background: a job is over when submit returns."""


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
    paths: list[str]  # readable paths, in input order (rows of ``pixels``)
    pixels: np.ndarray | None  # (B, 3, S, S) float32 network input, or None if every file failed
    images: list[np.ndarray]
    skipped: list[Skipped]
    #: every input path in order, with its row in ``tensor`` or its Skipped record
    order: list[tuple[str, int | Skipped]]
    hashes: list[str] = field(default_factory=list)  # per readable path, when images are kept

    @property
    def tensor(self) -> torch.Tensor | None:
        """:attr:`pixels` as a torch tensor (a view, no copy), for the PyTorch backbone."""
        if self.pixels is None:
            return None
        import torch

        return torch.from_numpy(self.pixels)


def _load_batch(paths: list[str], size: int, keep_images: bool, bit_depth: int | None = None,
                contrast: str | None = None) -> _Batch:
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
    pixels = network_input(imgs, size, contrast) if imgs else None
    hashes = [_sha256(p) for p in ok_paths] if keep_images else []
    return _Batch(ok_paths, pixels, imgs if keep_images else [], skipped, order, hashes)


def _sha256(path: str) -> str:
    from .labels import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return ""


def iter_batches(paths: list[str], size: int, batch_size: int, keep_images: bool = False,
                 bit_depth: int | None = None, contrast: str | None = None) -> Iterator[_Batch]:
    """Decode batches one ahead in a helper thread, so decoding overlaps the backbone.
    ``bit_depth``: the 16-bit rule of :func:`core.imageio.load_image`, ``contrast``: the grey
    levels' of :func:`core.imageio.network_input` (the detector's settings)."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="okng-decode") as pool:
        pending = pool.submit(_load_batch, chunks[0], size, keep_images, bit_depth, contrast)
        for nxt in chunks[1:] + [None]:
            batch = pending.result()
            if nxt is not None:
                pending = pool.submit(_load_batch, nxt, size, keep_images, bit_depth, contrast)
            yield batch


def split_calibration(paths: list[str], fraction: float, keep_in_fit: Iterable[str] = (),
                      held_before: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Deterministic, order-free split: which images are held out to calibrate the thresholds.

    Images are ranked by a hash of their path and every k-th in that ranking is held out, so
    the same OK set gives the same split (and the same thresholds) whatever order it comes in:
    the GUI's list, a folder walk on the command line, a recipe. The path hashed is the file's
    real one (absolute, symbolic links resolved), so a relative path, an absolute one and a
    linked folder name the same file alike. Both lists keep the input order, as spelt. Needs
    at least 5 images to hold any out; the fit set always keeps the majority.

    ``keep_in_fit``: images never held out, split around (the rest splits as it would without
    them). Parts an operator labelled "part is OK" go there: they were picked *because* they
    scored high, so held out they would set the threshold by themselves (one such part moved it
    from 66.9 to 83.0 and passed three defects), and added to the split they would reshuffle it.

    ``held_before``: the images the model being refitted held out (:attr:`Detector.calibration_paths`).
    Those still in the set (and not in ``keep_in_fit``) are held out again, the first in hash
    order if there are now more than the share, and only the shortfall is dealt by the rule
    above. Every k-th in hash order re-deals the whole ranking when one image comes or goes
    (one more OK image moved 16 of 40 held-out parts, and with 40 held out at a 1 % target
    the threshold is their highest score: 66.9 became 95.5); this way a refit after adding
    or removing a few images holds out what it held out before, give or take those few.
    """
    keep = set(keep_in_fit)
    free = [i for i, p in enumerate(paths) if p not in keep]
    if len(free) < 5 <= len(paths):  # too few others to hold any out: calibrate on all, as before
        free = list(range(len(paths)))
    n_cal = int(round(len(free) * fraction)) if len(free) >= 5 else 0
    if n_cal == 0:
        return list(paths), []
    real = {i: os.path.realpath(paths[i]) for i in free}
    keys = {i: hashlib.sha256(real[i].encode()).digest() for i in free}
    ranked = sorted(free, key=lambda i: (keys[i], i))
    step = len(free) / n_cal
    dealt = [ranked[int(i * step + step / 2)] for i in range(n_cal)]
    before = {os.path.realpath(p) for p in held_before}
    again = [i for i in ranked if real[i] in before][:n_cal]
    cal_idx = set(again)
    cal_idx.update([i for i in dealt if i not in cal_idx][: n_cal - len(cal_idx)])
    fit = [p for i, p in enumerate(paths) if i not in cal_idx]
    cal = [p for i, p in enumerate(paths) if i in cal_idx]
    return fit, cal


def fit_job(
    paths: Iterable[str | Path],
    config: DetectorConfig,
    token: CancelToken,
    extractor: FeatureExtractor | None = None,
    runtime: str | None = None,
    feedback: bool = False,
    keep_in_fit: Iterable[str] = (),
    held_before: Iterable[str] = (),
) -> Generator[Progress, None, FitResult]:
    """Fit a detector on OK images and calibrate its thresholds on a held-out share
    (``keep_in_fit``: images never held out; ``held_before``: what the model being refitted
    held out, held out again; see :func:`split_calibration`).

    Memory stays constant in the number of fitted images (statistics are streamed). The
    held-out images stay out of the model, so the stated false-alarm rate is measured on
    unseen OK parts, and stays honest when feedback later changes the model: their
    embeddings are kept (float16) and re-scored after every change. With tiling settings
    (``config.tile``; ``auto`` is decided by the first OK image's size) the fit is
    :func:`core.tiled_jobs.tiled_fit_job`, and the model records the tiling it was fitted with.

    Fitting embeds with PyTorch; at the end the detector's inspection runtime is prepared
    (``runtime``: None = ``OKNG_RUNTIME`` or auto, see :mod:`core.runtime`).
    """
    import torch

    from .detector import Detector

    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    keep_in_fit = frozenset(str(p) for p in keep_in_fit)
    held_before = tuple(str(p) for p in held_before)
    if not paths:
        raise NotFittedError("no OK images given: add OK images to fit a model")
    if config.tile is not None:  # high resolution: tiles (core.tiling), "auto" decided by the first image
        from .tiled_jobs import first_image_size, tiled_fit_job

        first = first_image_size(paths, config.bit_depth)
        config = config.resolve_tiling(*first)
        if config.tiled:
            return (yield from tiled_fit_job(paths, config, token, first, extractor, runtime, keep_in_fit,
                                                  held_before))
    yield Progress(0, len(paths), "loading backbone")
    fit_paths, cal_paths = split_calibration(paths, config.calibration_fraction, keep_in_fit, held_before)
    det = Detector.create(config, extractor, n_images=len(paths))
    det.model.check_fit_size(len(fit_paths))  # e.g. more k-means components than images
    # Compiled scoring code now, while the heap is small: loaded at the first score, inside
    # calibration, numba's ~130 MB landed on top of the fit's peak and made the peak vary by
    # ±50 MB between runs (benchmarks/bench_engine.py).
    det.warm_up(feedback)  # feedback: clicks will follow (the station), load their kernels too
    result = FitResult(det)
    done = 0
    for batch in iter_batches(fit_paths, det.image_size, config.batch_size, bit_depth=config.bit_depth,
                              contrast=config.contrast):
        token.raise_if_cancelled()
        result.skipped += batch.skipped
        if batch.tensor is not None:
            det.fit_embeddings(det.embed_torch(batch.tensor))
            result.fitted += batch.paths
        done += len(batch.paths) + len(batch.skipped)
        yield Progress(done, len(paths), f"fitting: {done}/{len(paths)} images")
    if not result.fitted:
        raise none_readable(len(fit_paths), result.skipped)
    # The held-out images are embedded before finalize, so their backbone passes do not
    # stack on the model's derived tensors (precisions): the peak stays the fit loop's.
    # One preallocated float16 block instead of a list + cat: at 800 images a list of
    # chunks plus the concatenated copy cost ~120 MB of peak RSS (measured), this 25 MB.
    h, w = det.embedder.grid_size
    held = torch.empty((len(cal_paths), det.embedder.n_channels, h, w), dtype=torch.float16)
    n_held = 0
    for batch in iter_batches(cal_paths, det.image_size, config.batch_size, bit_depth=config.bit_depth,
                              contrast=config.contrast):
        token.raise_if_cancelled()
        result.skipped += batch.skipped
        if batch.tensor is not None:
            emb = det.embed_torch(batch.tensor)
            held[n_held : n_held + emb.shape[0]] = emb
            n_held += emb.shape[0]
            result.calibration += batch.paths
        done += len(batch.paths) + len(batch.skipped)
        yield Progress(done, len(paths), f"calibrating: {done}/{len(paths)} images")
    if getattr(det.model, "trains", False):
        # a network (core.models.trained): epochs with progress, cancel before every batch,
        # early stopping on the held-out OK images, the engineer's time budget
        yield from det.model.train(held[:n_held], token)
    else:
        yield Progress(done, len(paths), "building the model")  # PatchCore's coreset: a minute
    release_free_memory()  # hand back the loops' freed batch buffers before finalize
    det.finalize()
    if n_held:
        det.calibrate_on(held[:n_held] if n_held < held.shape[0] else held)
        det.calibration_paths = tuple(os.path.abspath(p) for p in result.calibration)
    else:
        log.warning("no OK images held out for calibration (fewer than 5 images, or calibration "
                    "fraction 0): set the thresholds by hand")
    yield Progress(done, len(paths), "preparing the inspection runtime")
    det.use_runtime(runtime)
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
    keep_embeddings: bool = False,
) -> Generator[Progress, None, InspectSummary]:
    """Score images in input order; each Progress carries one ScoredImage or Skipped.

    Results are streamed, never accumulated: a run over 10,000 images holds one batch of
    anomaly maps at a time, and the consumer keeps what it needs (a CSV row, a table row).
    """
    paths = [str(p) for p in paths]
    if detector.config.tiled:
        from .tiled_jobs import tiled_inspect_job

        return (yield from tiled_inspect_job(paths, detector, token, keep_images))
    bs = batch_size or detector.config.batch_size
    done = scored = 0
    for batch in iter_batches(paths, detector.image_size, bs, keep_images=keep_images,
                              bit_depth=detector.config.bit_depth, contrast=detector.config.contrast):
        token.raise_if_cancelled()
        t = time.perf_counter()
        emb = detector.embed(batch.pixels) if batch.pixels is not None else None
        results = detector.inspect_embeddings(emb) if emb is not None else []
        per = (time.perf_counter() - t) / max(len(results), 1)
        for p, row in batch.order:
            if isinstance(row, Skipped):
                item: ScoredImage | Skipped = row
            else:
                kept = _half(emb[row : row + 1]) if keep_embeddings and emb is not None else None
                item = ScoredImage(p, results[row], batch.images[row] if keep_images else None, per, kept,
                                   batch.hashes[row] if keep_images else "")
                scored += 1
            done += 1
            yield Progress(done, len(paths), Path(p).name, item)
    release_free_memory()
    return InspectSummary(scored, done - scored)


def _half(emb: torch.Tensor) -> torch.Tensor:
    from .sources import half_precision

    return half_precision(emb)


def inspect_paths(paths: Iterable[str | Path], detector: Detector,
                  token: CancelToken | None = None) -> list[ScoredImage | Skipped]:
    """Inspect a (small) list of images and return every result, in input order.

    For scripts and tests; long runs should consume :func:`inspect_job`'s stream instead.
    """
    return [p.item for p in inspect_job(paths, detector, token or CancelToken()) if p.item is not None]


def load_model_job(path: str | Path, extractor: FeatureExtractor | None, token: CancelToken,
                   runtime: str | None = None, feedback: bool = False) -> Generator[Progress, None, Detector]:
    """Load a model file (sharing an already loaded backbone when it matches) and load the
    compiled scoring kernel and the inspection runtime (``runtime``: None = ``OKNG_RUNTIME``
    or auto; :attr:`Detector.runtime_name` says which) now, not in the operator's first
    inspection."""
    from .persistence import load_detector

    yield Progress(0, 1, f"loading model {Path(path).name}")
    det = load_detector(path, extractor, runtime=runtime)  # exports the graph the first time
    det.warm_up(feedback)
    return det


def save_model_job(detector: Detector, path: str | Path, token: CancelToken) -> Generator[Progress, None, Path]:
    """Save a model file atomically (the previous file stays whole on any failure)."""
    from .persistence import save_detector

    yield Progress(0, 1, f"saving model {Path(path).name}")
    return save_detector(detector, path)
