"""Evaluate a detector on labelled OK and NG images (``okng eval``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .detector import Detector
from .jobs import CancelToken, Progress, ScoredImage, Skipped, inspect_job


@dataclass
class Evaluation:
    n_ok: int
    n_ng: int
    image_auroc: float
    fpr_at_95_tpr: float
    threshold: float | None
    at_threshold: dict[str, float] | None
    best_f1_threshold: float
    best_f1: float
    skipped: list[Skipped] = field(default_factory=list)
    scores_ok: list[float] = field(default_factory=list)
    scores_ng: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_ok": self.n_ok, "n_ng": self.n_ng,
            "image_auroc": self.image_auroc, "fpr_at_95_tpr": self.fpr_at_95_tpr,
            "threshold": self.threshold, "at_threshold": self.at_threshold,
            "best_f1_threshold": self.best_f1_threshold, "best_f1": self.best_f1,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }


def evaluate_job(det: Detector, ok_paths: list[str], ng_paths: list[str], token: CancelToken):
    """Generator job: score both sets and compute image-level metrics."""
    labelled = [(p, 0) for p in ok_paths] + [(p, 1) for p in ng_paths]
    scores, labels, skipped = [], [], []
    for progress in inspect_job([p for p, _ in labelled], det, token):
        r = progress.item
        if isinstance(r, Skipped):
            skipped.append(r)
        elif isinstance(r, ScoredImage):
            scores.append(r.inspection.score)
            labels.append(labelled[progress.done - 1][1])
        yield progress
    s, y = np.array(scores), np.array(labels)
    th = det.thresholds.image if det.thresholds else None
    best_t, best_f1 = metrics.best_f1_threshold(y, s) if len(s) else (float("nan"), float("nan"))
    yield Progress(len(labelled), len(labelled), "metrics")
    return Evaluation(
        n_ok=int((y == 0).sum()), n_ng=int((y == 1).sum()),
        image_auroc=metrics.auroc(y, s), fpr_at_95_tpr=metrics.fpr_at_tpr(y, s, 0.95),
        threshold=th, at_threshold=metrics.confusion_at(y, s, th) if th is not None else None,
        best_f1_threshold=best_t, best_f1=best_f1, skipped=skipped,
        scores_ok=s[y == 0].tolist(), scores_ng=s[y == 1].tolist(),
    )
