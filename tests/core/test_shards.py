"""The arithmetic of a sharded fit (core/shards.py), without Ray: shards merged in order give
the local fit's model (PaDiM family: to float64 rounding; k-means: exactly; PatchCore: a
close approximation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.detector import Detector, DetectorConfig
from core.jobs import CancelToken, fit_job, inspect_paths, run_job, split_calibration
from core.metrics import auroc
from core.shards import FIT, HELD_OUT, finish, fit_shard, merge_shard, plan


def sharded_fit(paths: list[str], config: DetectorConfig, n_shards: int) -> Detector:
    """What core.ray_fit does, with the shards run here one after the other."""
    fit_paths, cal_paths = split_calibration(paths, config.calibration_fraction)
    det = Detector.create(config)
    merged, fitted, held = None, [], []
    for shard in plan(fit_paths, config.batch_size, n_shards):
        r = fit_shard(config, shard, FIT, det.extractor)
        fitted += r.fitted
        merged = merge_shard(det.model, r.state, merged)
    for shard in plan(cal_paths, config.batch_size, n_shards):
        held.append(fit_shard(config, shard, HELD_OUT, det.extractor).state["embeddings"])
    finish(det.model, merged, len(fitted) * det.model.n_patches)
    det.finalize()
    det.calibrate_on(torch.cat(held))
    return det


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


@pytest.fixture
def many_parts(tmp_path):
    import cv2

    from tests.conftest import make_part

    rng = np.random.default_rng(1)
    paths = []
    for i in range(26):
        p = tmp_path / f"ok_{i:02d}.png"
        cv2.imwrite(str(p), make_part(rng))
        paths.append(str(p))
    return paths


def test_plan_cuts_whole_batches_in_order():
    paths = [f"p{i}" for i in range(23)]
    shards = plan(paths, 4, 3)
    assert sum(shards, []) == paths
    assert all(len(s) % 4 == 0 for s in shards[:-1]) and len(shards) == 3
    assert plan(paths, 4, 100) == [paths[i : i + 4] for i in range(0, 23, 4)]  # never below a batch
    assert plan([], 4, 3) == []


# every PaDiM variant, through Ray: tests/core/test_ray_local.py
@pytest.mark.parametrize("kind,params", [("padim-lowrank", {"rank": 10})])
def test_sharded_fit_equals_the_local_fit(kind, params, many_parts):
    config = DetectorConfig.for_model(kind, weights="random", image_size=64, n_channels=24, batch_size=4,
                                      model_params=params)
    local = run_job(fit_job(many_parts, config, CancelToken(), runtime="torch")).detector
    sharded = sharded_fit(many_parts, config, n_shards=3)
    want, got = local.model.tensors(), sharded.model.tensors()
    assert want.keys() == got.keys()
    for name in want:
        assert relative_error(want[name], got[name]) < 1e-9, name
    assert sharded.thresholds.image == pytest.approx(local.thresholds.image, rel=1e-9)
    assert sharded.thresholds.pixel == pytest.approx(local.thresholds.pixel, rel=1e-9)
    assert torch.equal(sharded.calibration_embeddings, local.calibration_embeddings)


def test_sharded_patchcore_keeps_the_coreset_size_and_scores_close_to_the_local_fit(many_parts, part_images):
    config = DetectorConfig.for_model("patchcore", weights="random", image_size=64, n_channels=24, batch_size=4)
    local = run_job(fit_job(many_parts, config, CancelToken(), runtime="torch")).detector
    sharded = sharded_fit(many_parts, config, n_shards=3)
    assert sharded.model.bank.shape == local.model.bank.shape  # the final coreset: the local size
    assert sharded.model.n_samples == local.model.n_samples
    ok, ng = part_images
    scores = {}
    for name, det in (("local", local), ("sharded", sharded)):
        scores[name] = np.array([r.inspection.score for r in inspect_paths(ok + ng, det)])
    # a coreset of coresets is not the greedy over all patches: close, not equal
    # (measured: 4 % on average, 11-22 % at most on OK parts, whose distances are small; 1 % on defects)
    diff = np.abs(scores["sharded"] / scores["local"] - 1)
    assert diff.mean() < 0.08 and diff.max() < 0.3
    labels = np.array([0] * len(ok) + [1] * len(ng))
    assert abs(auroc(labels, scores["sharded"]) - auroc(labels, scores["local"])) <= 0.05
