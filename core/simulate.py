"""Play the operator: what would N false-alarm clicks buy on this data? (issue 4)

From a pool of unseen OK images, each one the station flags NG gets one click on its hottest
region ("false alarm"). At 0 clicks and at each checkpoint the detector is evaluated on a
disjoint held-out set of OK and NG images: false-alarm and detection rate at the model's
image threshold (clicks keep it, as in the station), image AUROC and FPR at 95 % TPR, and
``defects_flipped``: how many
defective images judged NG at 0 clicks are judged OK now (what feedback silently passed).
The model file is not changed.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import metrics
from .detector import Detector
from .feedback import FeedbackLearner
from .jobs import CancelToken, Progress, iter_batches
from .regions import find_regions


@dataclass
class Checkpoint:
    clicks: int
    false_alarm_rate: float
    detection_rate: float
    auroc: float
    fpr_at_95_tpr: float
    threshold: float | None
    pool_images_seen: int
    #: evaluation defective images judged NG at 0 clicks and OK now (feedback passed them)
    defects_flipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SimulationResult:
    checkpoints: list[Checkpoint] = field(default_factory=list)
    click_seconds: list[float] = field(default_factory=list)
    pool_exhausted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "click_seconds_median": float(np.median(self.click_seconds)) if self.click_seconds else None,
            "pool_exhausted": self.pool_exhausted,
        }


def _embed_all(det: Detector, paths: list[str], token: CancelToken) -> list[torch.Tensor]:
    out = []
    for batch in iter_batches(paths, det.image_size, det.config.batch_size, bit_depth=det.config.bit_depth,
                              contrast=det.config.contrast):
        token.raise_if_cancelled()
        if batch.tensor is not None:
            out.append(det.embed(batch.tensor))
    return out


def hottest_region_mask(anomaly_map: np.ndarray, level: float | None) -> np.ndarray:
    """The region an operator would click: the one holding the map's peak."""
    peak = float(anomaly_map.max())
    lvl = level if level is not None and level < peak else 0.8 * peak
    r, c = np.unravel_index(int(anomaly_map.argmax()), anomaly_map.shape)
    for reg in find_regions(anomaly_map, lvl, min_area=1):
        if reg.mask[r, c]:
            return reg.mask
    return anomaly_map >= lvl


def _evaluate(det: Detector, ok: list[torch.Tensor], ng: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    def scores(embs):
        return np.concatenate([det.maps_and_scores(e)[1] for e in embs]) if embs else np.zeros(0)

    s_ok, s_ng = scores(ok), scores(ng)
    return np.r_[np.zeros(len(s_ok)), np.ones(len(s_ng))], np.r_[s_ok, s_ng]


def simulate_feedback_job(
    det: Detector, pool: list[str], ok: list[str], ng: list[str], clicks: list[int], token: CancelToken,
    reweight: bool = False,
) -> Generator[Progress, None, SimulationResult]:
    det.require_whole_images("simulated feedback")
    if det.thresholds is None:
        raise ValueError("the model has no calibrated threshold: fit it on at least 5 OK images")
    total = len(ok) + len(ng) + len(pool)
    yield Progress(0, total, "embedding the evaluation set")
    ok_e, ng_e = _embed_all(det, ok, token), _embed_all(det, ng, token)
    learner = FeedbackLearner(det.copy(), reweight=reweight)
    result = SimulationResult()
    targets = sorted(set(int(c) for c in clicks if c > 0))

    ng_at_start: list[np.ndarray] = []

    def checkpoint(n_clicks: int, seen: int) -> None:
        d = learner.detector
        y, s = _evaluate(d, ok_e, ng_e)
        judged_ng = s[y == 1] > d.thresholds.image
        if not ng_at_start:
            ng_at_start.append(judged_ng)
        flipped = int((ng_at_start[0] & ~judged_ng).sum())
        at = metrics.confusion_at(y, s, d.thresholds.image)
        result.checkpoints.append(Checkpoint(n_clicks, at["false_alarm_rate"], at["detection_rate"],
                                             metrics.auroc(y, s), metrics.fpr_at_tpr(y, s), d.thresholds.image, seen,
                                             flipped))

    checkpoint(0, 0)
    n_clicks, seen = 0, 0
    for batch in iter_batches(pool, det.image_size, 1, bit_depth=det.config.bit_depth, contrast=det.config.contrast):
        if not targets or n_clicks >= targets[-1]:
            break
        token.raise_if_cancelled()
        seen += 1
        yield Progress(len(ok) + len(ng) + seen, total, f"pool image {seen}, {n_clicks} clicks")
        if batch.tensor is None:
            continue
        emb = learner.detector.embed(batch.tensor)
        maps, scores = learner.detector.maps_and_scores(emb)
        if scores[0] <= learner.detector.thresholds.image:
            continue  # not flagged: the operator does nothing
        rec = learner.mark_false_alarm(emb, hottest_region_mask(maps[0], learner.detector.thresholds.pixel))
        result.click_seconds.append(rec.seconds)
        n_clicks += 1
        if n_clicks in targets:
            checkpoint(n_clicks, seen)
    # ran out: the pool ended before the last checkpoint's clicks (reaching it on the pool's
    # last image is not running out)
    result.pool_exhausted = bool(targets) and n_clicks < targets[-1]
    if n_clicks and (not result.checkpoints or result.checkpoints[-1].clicks != n_clicks):
        checkpoint(n_clicks, seen)
    return result
