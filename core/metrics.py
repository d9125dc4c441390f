"""Evaluation metrics: image AUROC, FPR at 95 % TPR, F1; pixel AUROC and PRO.

Pure numpy, exact (tied scores handled by average ranks), no scikit-learn needed at run time.
Labels: 1 = defective (NG, positive), 0 = good (OK).
"""
from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    # average ranks over ties
    _, start, counts = np.unique(sx, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return ranks


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing; a score >= threshold is NG."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (1 + distinct) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return fps / n_neg, tps / n_pos, s[distinct]


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr_target: float = 0.95) -> float:
    """False-positive rate at the first threshold that reaches ``tpr_target`` recall."""
    fpr, tpr, _ = roc_curve(labels, scores)
    hit = np.nonzero(tpr >= tpr_target)[0]
    return float(fpr[hit[0]]) if hit.size else 1.0


def confusion_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Counts and rates when ``score > threshold`` means NG."""
    labels = np.asarray(labels).astype(bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() > threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    tn = int((~pred & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "false_alarm_rate": fp / (fp + tn) if fp + tn else 0.0,
        "detection_rate": recall, "precision": precision, "f1": f1,
    }


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 with ``score > threshold`` as NG."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    cand = np.unique(scores)
    # thresholds just below each distinct score, so that score itself counts as NG
    below = np.r_[cand[0] - 1.0, (cand[:-1] + cand[1:]) / 2.0]
    best_t, best_f1 = float(below[0]), -1.0
    order = np.argsort(-scores)
    s, y = scores[order], labels[order]
    tps = np.cumsum(y)
    n_pos = max(int(y.sum()), 1)
    for t in below:
        k = int(np.searchsorted(-s, -t, side="left"))  # number of scores > t
        tp = tps[k - 1] if k else 0
        f1 = 2 * tp / (k + n_pos) if k + n_pos else 0.0
        if f1 > best_f1:
            best_t, best_f1 = float(t), float(f1)
    return best_t, best_f1


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels; masks (N, H, W) bool, maps (N, H, W) float."""
    return auroc(np.asarray(masks).ravel(), np.asarray(maps).ravel())


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, steps: int = 200) -> float:
    """Per-Region Overlap, integrated up to ``max_fpr`` and normalised to [0, 1].

    For each threshold, the mean over ground-truth regions of the fraction of the region
    detected (Bergmann et al., MVTec AD); regions come from 8-connected components.
    """
    import cv2

    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    regions = []
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [(i, lab == k) for k in range(1, n)]
    if not regions or masks.all():
        return float("nan")
    neg = maps[~masks]
    thresholds = np.quantile(neg, np.linspace(1.0 - max_fpr, 1.0, steps))[::-1]
    fprs, pros = [], []
    for t in thresholds:
        fprs.append(float((neg > t).mean()))
        pros.append(float(np.mean([(maps[i][r] > t).mean() for i, r in regions])))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= max_fpr
    f, p = np.r_[0.0, fprs[keep]], np.r_[0.0, pros[keep]]
    area = float(np.sum((f[1:] - f[:-1]) * (p[1:] + p[:-1]) / 2.0))
    return area / max_fpr
