"""``okng fit --ray``: the OK images embedded on a Ray cluster, the model merged here.

The driver splits the OK images exactly as a local fit does (:func:`core.jobs.split_calibration`:
the same held-out images, so the same thresholds), cuts both lists into shards of whole
batches, and runs one Ray task per shard (:func:`fit_shard_task`). Fit shards send back
mergeable state, held-out shards their float16 embeddings (what a local fit keeps); the
driver merges in shard order (:mod:`core.shards`), finalizes and calibrates, and the
caller saves the same model file a local fit writes.
"""
from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterable
from pathlib import Path

import torch

from .allocator import release_free_memory
from .backbone import BackboneSpec, FeatureExtractor
from .detector import Detector, DetectorConfig
from .errors import NotFittedError
from .jobs import CancelToken, FitResult, Progress, none_readable, split_calibration
from .ray_cluster import TASK_RETRIES, RayOptions, cluster_cpus, connected, ordered
from .shards import FIT, HELD_OUT, ShardResult, finish, fit_shard, merge_shard, plan

#: per worker process: the backbone, loaded by the first shard only
_EXTRACTORS: dict[BackboneSpec, FeatureExtractor] = {}
#: shards per task slot: more gives smoother progress and load balance, but every fit shard
#: sends its statistics (63 MB at 784 patches x 100 channels) to the driver
SHARDS_PER_SLOT = 2


def fit_shard_task(config: DetectorConfig, paths: list[str], role: str, threads: int) -> ShardResult:
    """Runs on a Ray worker: one shard, embedded with ``threads`` PyTorch threads."""
    torch.set_num_threads(threads)
    spec = config.backbone_spec()
    if spec not in _EXTRACTORS:
        _EXTRACTORS.clear()
        _EXTRACTORS[spec] = FeatureExtractor(spec)
    return fit_shard(config, paths, role, _EXTRACTORS[spec])


def ray_fit_job(paths: Iterable[str | Path], config: DetectorConfig, token: CancelToken, options: RayOptions,
                runtime: str | None = None, held_before: Iterable[str] = ()) -> Generator[Progress, None, FitResult]:
    """:func:`core.jobs.fit_job` with the backbone passes on Ray (same result, see
    :mod:`core.shards` for what is exact per model; ``held_before`` as there)."""
    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    if not paths:
        raise NotFittedError("no OK images given: add OK images to fit a model")
    if config.tile is not None:
        raise ValueError("a fit on Ray does not tile yet: fit tiled models locally (without --ray)")
    yield Progress(0, len(paths), "loading backbone")
    fit_paths, cal_paths = split_calibration(paths, config.calibration_fraction, (), held_before)
    det = Detector.create(config, n_images=len(paths))
    det.model.check_fit_size(len(fit_paths))
    det.warm_up()
    result = FitResult(det)
    with connected(options) as ray:
        yield Progress(0, len(paths), "connected to Ray")
        slots = max(1, cluster_cpus(ray) // max(1, options.threads)) * SHARDS_PER_SLOT
        calls = [(config, s, FIT, options.threads) for s in plan(fit_paths, config.batch_size, slots)]
        calls += [(config, s, HELD_OUT, options.threads) for s in plan(cal_paths, config.batch_size, slots)]
        task = ray.remote(fit_shard_task).options(num_cpus=options.threads, max_retries=TASK_RETRIES)
        finished: list[int] = []
        merged, held = None, []
        for _i, shard in ordered(ray, task, calls, window=2 * slots, on_done=finished.append):
            token.raise_if_cancelled()
            result.skipped += shard.skipped
            if shard.role == FIT:
                result.fitted += shard.fitted
                merged = merge_shard(det.model, shard.state, merged)
            else:
                result.calibration += shard.fitted
                if shard.state:
                    held.append(shard.state["embeddings"])
            done = sum(len(calls[j][1]) for j in finished)
            yield Progress(done, len(paths), f"fitting on Ray: {done}/{len(paths)} images")
    if not result.fitted:
        raise none_readable(len(fit_paths), result.skipped)
    finish(det.model, merged, len(result.fitted) * det.model.n_patches)
    if getattr(det.model, "trains", False):  # the network trains on the driver, as in a local fit
        yield from det.model.train(torch.cat(held) if held else None, token)
    else:
        yield Progress(len(paths), len(paths), "building the model")
    release_free_memory()
    det.finalize()
    if held:
        det.calibrate_on(torch.cat(held))
        det.calibration_paths = tuple(os.path.abspath(p) for p in result.calibration)
    yield Progress(len(paths), len(paths), "preparing the inspection runtime")
    det.use_runtime(runtime)
    result.seconds = time.perf_counter() - t0
    return result
