"""``okng score --ray``: an archive scored by Ray tasks, the rows written here in input order.

The model file travels once through Ray's object store to each node (a file named by its
digest in the station's cache folder, :func:`_model_file`); each worker process loads it at
its first task and keeps it (:func:`_detector`), so a worker pays the load once, not per
task. A task scores a chunk of consecutive images (whole batches, so every backbone pass
sees the batch a local run gives it) with :func:`core.jobs.inspect_job`, the local code,
and returns one small record per image: the score, verdict and peak (and the heatmap as PNG
bytes when asked), or the :class:`~core.jobs.Skipped` record of an unreadable file. The
driver turns them into CSV rows with the same code as a local run, in input order
(:func:`core.ray_cluster.ordered`), so the file is the local one row for row.

A worker killed mid-task loses only that task's unfinished chunk: Ray reruns the task
elsewhere (``max_retries``) and the driver takes each chunk's rows once.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from .jobs import CancelToken, InspectSummary, Progress, ScoredImage, Skipped, inspect_job
from .ray_cluster import TASK_RETRIES, RayOptions, cluster_cpus, connected, ordered

#: images per task unless --ray-chunk says: this many batches (64 images at batch size 8,
#: ~1.5 s of work at 224 px: the per-task overhead, a few ms, is then lost in the noise)
CHUNK_BATCHES = 8


@dataclass(frozen=True)
class ScoredRow:
    """One scored image as a worker sends it back: what a CSV row (and heatmap) needs."""

    path: str
    score: float
    verdict: str
    peak: float
    heatmap_png: bytes | None = None


#: per worker process: (model digest, runtime, threads) -> (detector, folder of its file)
_LOADED: dict[tuple[str, str, int], object] = {}


def _model_file(digest: str, model_box: list) -> Path:
    """The model as a file on this node, named by its digest in the station's cache folder:
    written once per node (atomically; workers may race), reused by every worker and run,
    with its embedding graph exported beside it once. (A temporary folder per worker would
    be left behind: Ray ends idle workers without running their exit handlers.)"""
    from .runtime import cache_dir

    path = cache_dir() / "ray-models" / f"model-{digest}.okng"
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        import ray

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(ray.get(model_box[0]))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def _detector(digest: str, model_box: list, runtime: str, threads: int):
    """The worker's detector for this model, loaded at its first task only."""
    key = (digest, runtime, threads)
    if key not in _LOADED:
        from .runtime import load_for_inspection

        _LOADED.clear()
        det = load_for_inspection(_model_file(digest, model_box), runtime)
        det.warm_up()
        _LOADED[key] = det
    return _LOADED[key]


def score_chunk(digest: str, model_box: list, runtime: str, threads: int, paths: list[str],
                heatmaps: bool) -> list[ScoredRow | Skipped]:
    """Runs on a Ray worker: score ``paths`` in order, one record per path."""
    torch.set_num_threads(threads)
    det = _detector(digest, model_box, runtime, threads)
    out: list[ScoredRow | Skipped] = []
    for p in inspect_job(paths, det, CancelToken()):
        item = p.item
        if isinstance(item, ScoredImage):
            ins = item.inspection
            png = _png(ins.anomaly_map, det.thresholds) if heatmaps else None
            out.append(ScoredRow(item.path, ins.score, ins.verdict, ins.peak, png))
        elif item is not None:
            out.append(item)
    return out


def _png(anomaly_map, thresholds) -> bytes:
    import cv2

    from .cli import heatmap_image

    ok, buf = cv2.imencode(".png", heatmap_image(anomaly_map, thresholds))
    if not ok:
        raise RuntimeError("PNG encoding of a heatmap failed")
    return buf.tobytes()


def chunk_size(options: RayOptions, batch_size: int) -> int:
    """Images per task: ``options.chunk`` rounded up to whole batches."""
    want = options.chunk or CHUNK_BATCHES * batch_size
    return max(1, -(-want // batch_size)) * batch_size


def ray_inspect_job(paths: list[str], model_bytes: bytes, runtime: str, batch_size: int, options: RayOptions,
                    token: CancelToken, heatmaps: bool = False) -> Generator[Progress, None, InspectSummary]:
    """Like :func:`core.jobs.inspect_job` (a Progress per image, in input order, carrying a
    :class:`ScoredRow` or :class:`Skipped`), with the work done by Ray tasks."""
    size = chunk_size(options, batch_size)
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    done = scored = 0
    yield Progress(0, len(paths), "connecting to Ray")
    with connected(options) as ray:
        digest = hashlib.sha256(model_bytes).hexdigest()
        box = [ray.put(model_bytes)]  # in a list: a worker fetches it only when not loaded yet
        slots = max(1, cluster_cpus(ray) // max(1, options.threads))
        task = ray.remote(score_chunk).options(num_cpus=options.threads, max_retries=TASK_RETRIES)
        calls = [(digest, box, runtime, options.threads, c, heatmaps) for c in chunks]
        for i, items in ordered(ray, task, calls, window=2 * slots):
            token.raise_if_cancelled()
            if [it.path for it in items] != chunks[i]:
                raise RuntimeError(f"Ray task {i} returned rows for other images than it was given")
            for item in items:
                done += 1
                scored += isinstance(item, ScoredRow)
                yield Progress(done, len(paths), Path(item.path).name, item)
    return InspectSummary(scored, done - scored)
