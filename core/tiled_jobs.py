"""Fit and inspection jobs of a tiled detector (see :mod:`core.tiling`).

:func:`core.jobs.fit_job` and :func:`core.jobs.inspect_job` hand over to these when the
settings tile; callers never choose. The differences from whole-image jobs, all for memory
constant in the image size:

* one image at a time, no decoding ahead: the decoded image is the largest array of a run
  (50 MB at 4096 x 4096), and a second one decoded ahead would double it for the ~5 % of the
  time decoding takes next to a few hundred tiles through the backbone;
* a tile batch (``batch_size`` tiles) is the cancellation point and the unit of work;
* the held-out OK images are scored after the model is built, not kept as embeddings (every
  tile's features of every held-out image would grow with the image size): the thresholds come
  from their stitched maps, exactly as inspection makes them;
* no embedding is kept with a result (``keep_embeddings``): feedback on tiled models is not
  available yet (:meth:`core.detector.Detector.require_whole_images`).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator
from pathlib import Path

import numpy as np

from .allocator import release_free_memory
from .backbone import FeatureExtractor
from .detector import Detector, DetectorConfig
from .errors import ImageLoadError
from .imageio import load_image
from .jobs import (CancelToken, FitResult, InspectSummary, Progress, ScoredImage, Skipped, _sha256, none_readable,
                   split_calibration)
from .imageio import read_image_size
from .tiling import TilingError, plan_tiles, tile_batches

log = logging.getLogger(__name__)


def _load(path: str, bit_depth: int | None) -> tuple[np.ndarray | None, Skipped | None]:
    try:
        return load_image(path, bit_depth), None
    except ImageLoadError as exc:
        log.warning("skipped %s", exc)
        return None, Skipped(path, exc.reason)


def tiled_fit_job(paths: list[str], config: DetectorConfig, token: CancelToken, first_size: tuple[int, int],
                  extractor: FeatureExtractor | None = None,
                  runtime: str | None = None,
                  keep_in_fit: frozenset[str] = frozenset(),
                  held_before: tuple[str, ...] = ()) -> Generator[Progress, None, FitResult]:
    """:func:`core.jobs.fit_job` for resolved tiling settings; ``first_size``: (height, width)
    of the first readable OK image, whose tile count sizes the up-front checks."""
    t0 = time.perf_counter()
    # refuses a tile larger than the images now, not after the backbone is loaded
    per_image = plan_tiles(*first_size, config.tile, config.tile_overlap).n_tiles
    yield Progress(0, len(paths), "loading backbone")
    fit_paths, cal_paths = split_calibration(paths, config.calibration_fraction, keep_in_fit, held_before)
    # every tile is a sample of the one model: the checks count tiles, not images
    det = Detector.create(config, extractor, n_images=len(paths) * per_image)
    det.model.check_fit_size(len(fit_paths) * per_image)
    det.warm_up()
    result = FitResult(det)
    done = 0
    for path in fit_paths:
        image, skipped = _load(path, config.bit_depth)
        if skipped is not None:
            result.skipped.append(skipped)
        else:
            grid = plan_tiles(image.shape[0], image.shape[1], config.tile, config.tile_overlap)
            for _, batch in tile_batches(image, grid, det.image_size, config.batch_size):
                token.raise_if_cancelled()
                det.fit_embeddings(det.embed_torch(batch))
            result.fitted.append(path)
            del image
        done += 1
        yield Progress(done, len(paths), f"fitting: {done}/{len(paths)} images ({per_image} tiles each)")
    if not result.fitted:
        raise none_readable(len(fit_paths), result.skipped)
    yield Progress(done, len(paths), "building the model")
    release_free_memory()
    det.finalize()
    yield from _calibrate(det, cal_paths, token, result, done, len(paths))
    yield Progress(len(paths), len(paths), "preparing the inspection runtime")
    det.use_runtime(runtime)
    result.seconds = time.perf_counter() - t0
    release_free_memory()
    return result


def _calibrate(det: Detector, cal_paths: list[str], token: CancelToken, result: FitResult,
               done: int, total: int) -> Generator[Progress, None, None]:
    """Thresholds from the stitched maps of the held-out OK images (two passes for blob
    pooling, which needs the pixel level of the first, as :meth:`Detector.recalibrate`)."""
    from .thresholds import calibrate

    config = det.config
    passes = 2 if config.pooling == "blob" else 1
    for n_pass in range(passes):
        scores, peaks = [], []
        for path in cal_paths:
            scored = _inspect_one(path, det, token, keep_images=False)
            if isinstance(scored, Skipped):
                if n_pass == 0:
                    result.skipped.append(scored)
                continue
            scores.append(scored.inspection.score)
            peaks.append(scored.inspection.peak)
            scored = None  # its full-resolution map goes before the next image is decoded
            if n_pass == 0:
                result.calibration.append(path)
                done += 1
            yield Progress(done, total, f"calibrating: {done}/{total} images")
        if scores:
            det.thresholds = calibrate(np.asarray(scores), np.asarray(peaks), config.false_alarm_rate)
            det.calibration_paths = tuple(os.path.abspath(p) for p in result.calibration)
    if not result.calibration:
        log.warning("no OK images held out for calibration (fewer than 5 images, or calibration "
                    "fraction 0): set the thresholds by hand")


def _inspect_one(path: str, detector: Detector, token: CancelToken, keep_images: bool) -> ScoredImage | Skipped:
    """One image read, tiled, stitched and judged; the decoded image is let go before the
    full-resolution map is made (unless kept), so the two never add up. An image smaller
    than a tile is Skipped, with the reason."""
    image, skipped = _load(path, detector.config.bit_depth)
    if skipped is not None:
        return skipped
    t = time.perf_counter()
    try:
        stitcher = detector.stitch(image, token.raise_if_cancelled)
    except TilingError as exc:
        return Skipped(path, str(exc))
    kept, image = (image if keep_images else None), None
    release_free_memory()  # the decoded image's heap pages (see tiled_inspect_job)
    anomaly_map, score = detector.map_and_score(stitcher)
    stitcher = None
    return ScoredImage(path, detector.judge(score, anomaly_map), kept, time.perf_counter() - t, None,
                       _sha256(path) if keep_images else "")


def tiled_inspect_job(paths: list[str], detector: Detector, token: CancelToken,
                      keep_images: bool = False) -> Generator[Progress, None, InspectSummary]:
    """:func:`core.jobs.inspect_job` for a tiled detector: one image at a time, a Progress
    per image carrying its ScoredImage or Skipped (an image smaller than a tile is skipped,
    with the reason). The job holds no result while making the next one; a consumer that
    lets each go (``okng score``) holds one full-resolution map at a time."""
    done = scored = 0
    for path in paths:
        token.raise_if_cancelled()
        item = _inspect_one(path, detector, token, keep_images)
        scored += isinstance(item, ScoredImage)
        done += 1
        yield Progress(done, len(paths), Path(path).name, item)
        # The station's allocator keeps blocks under 128 MB in the heap (core.allocator): the
        # freed map and image would stay resident and the next image's land beside them.
        item = None
        release_free_memory()
    release_free_memory()
    return InspectSummary(scored, done - scored)


def first_image_size(paths: list[str], bit_depth: int | None) -> tuple[int, int]:
    """(height, width) of the first OK image that can be read."""
    skipped = []
    for path in paths:
        try:
            return read_image_size(path, bit_depth)
        except ImageLoadError as exc:
            skipped.append(Skipped(str(path), exc.reason))
    raise none_readable(len(paths), skipped)
