"""Decision thresholds: calibrated on OK images alone, or best-F1 when defects are known.

With OK images only, the image threshold is the (1 - far) quantile of held-out OK scores,
so the station can state the expected false-alarm rate at any threshold as the fraction of
calibration scores above it. The pixel threshold uses the same rule on per-image map maxima:
a region is outlined exactly where it would make the part NG under max pooling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Thresholds:
    image: float
    pixel: float
    #: held-out OK image scores behind ``image`` (empty if set by hand)
    calibration_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: held-out OK per-image map maxima behind ``pixel``
    calibration_peaks: np.ndarray = field(default_factory=lambda: np.zeros(0))
    target_false_alarm_rate: float = 0.01

    def expected_false_alarm_rate(self, threshold: float | None = None) -> float | None:
        """Fraction of calibration OK images scoring above ``threshold`` (None if unknown)."""
        if self.calibration_scores.size == 0:
            return None
        t = self.image if threshold is None else threshold
        return float((self.calibration_scores > t).mean())

    def false_alarm_bound(self, threshold: float | None = None, confidence: float = 0.95) -> float | None:
        """Upper confidence bound on the false-alarm rate at ``threshold`` (None if unknown)."""
        if self.calibration_scores.size == 0:
            return None
        t = self.image if threshold is None else threshold
        k = int((self.calibration_scores > t).sum())
        return false_alarm_upper_bound(k, int(self.calibration_scores.size), confidence)

    def matches_calibration(self) -> bool:
        """True when both thresholds are what calibration at the target rate gives on the
        stored held-out scores, i.e. nobody set them by hand since."""
        if self.calibration_scores.size == 0 or self.calibration_peaks.size == 0:
            return False
        far = self.target_false_alarm_rate
        # either rule: model files written before the margin rest exactly on the score
        return any(self.image == quantile_threshold(self.calibration_scores, far, m)
                   and self.pixel == quantile_threshold(self.calibration_peaks, far, m)
                   for m in (CALIBRATION_MARGIN, 0.0))


def false_alarm_upper_bound(false_alarms: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a false-alarm rate seen as ``false_alarms``
    out of ``n`` held-out OK parts: the true rate is below it with ``confidence``.

    With 0 of 40 the bound is 7.2 %: 40 parts cannot show that a station meets 1 %.
    """
    if n <= 0:
        return 1.0
    k = min(max(int(false_alarms), 0), n)
    if k == n:
        return 1.0
    alpha = 1.0 - confidence

    def cdf(p: float) -> float:  # P(X <= k) for X ~ Binomial(n, p), in log space
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        lp, lq = math.log(p), math.log1p(-p)
        terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
                 for i in range(k + 1)]
        top = max(terms)
        return math.exp(top) * sum(math.exp(t - top) for t in terms)

    lo, hi = k / n, 1.0
    for _ in range(60):  # cdf falls as p rises: bisect for cdf(p) = alpha
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > alpha else (lo, mid)
    return hi


def held_out_needed(false_alarm_rate: float, confidence: float = 0.95) -> int:
    """Held-out OK parts needed before zero false alarms can show a rate below the target."""
    if false_alarm_rate <= 0:
        return 0
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-false_alarm_rate))


def false_alarm_statement(th: Thresholds | None, threshold: float | None = None) -> tuple[str, bool]:
    """What the held-out OK parts say about false alarms at ``threshold`` (default: the image
    threshold), as the Thresholds panel and ``okng fit`` state it: the measured rate, its
    one-sided 95 % upper bound and the number of parts, and whether it deserves a warning
    (too few parts to show the target, or a bound above twice the target)."""
    if th is None or th.calibration_scores.size == 0:
        return "unknown (no held-out OK images to measure them on)", True
    t = th.image if threshold is None else threshold
    n = int(th.calibration_scores.size)
    k = int((th.calibration_scores > t).sum())
    bound = false_alarm_upper_bound(k, n)
    text = f"{k / n:.1%} of OK parts (at most {bound:.1%} with 95 % confidence; {n} held-out parts)"
    target, needed = th.target_false_alarm_rate, held_out_needed(th.target_false_alarm_rate)
    if k / n > target:  # measured above the target: more parts would not change that
        text += f" — above the {target:.0%} target at this threshold: raise it, or teach the station these parts"
    elif n < needed:
        text += f" — too few held-out parts to show {target:.0%}: add OK images ({needed} held out needed)"
    return text, n < needed or bound > 2 * max(target, 1e-9)


#: how far above the held-out score it rests on a calibrated threshold sits, relative to that
#: score: the same part scored again lands a little off its calibration score (the held-out
#: embeddings are kept in float16 and re-scored after every change; another runtime rounds
#: differently): 6e-5 relative was seen, and a threshold exactly on the score made that very
#: part NG while the station stated 0 % false alarms on it
CALIBRATION_MARGIN = 1e-3


def quantile_threshold(ok_scores: np.ndarray, false_alarm_rate: float, margin: float = CALIBRATION_MARGIN) -> float:
    """Smallest threshold with at most ``false_alarm_rate`` of ``ok_scores`` above it, raised
    by ``margin`` (relative) so that the part it rests on stays OK when scored again; never
    up to the next higher score (the count above stays what the target allows)."""
    s = np.sort(np.asarray(ok_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no OK scores to calibrate on")
    allowed = int(np.floor(false_alarm_rate * s.size))  # how many may lie above
    base = float(s[s.size - 1 - allowed])
    raised = base + margin * max(abs(base), 1e-12)
    higher = s[s > base]
    if higher.size:  # stay below the next higher score (a tie is passed along with base): half way at most
        raised = min(raised, base + (float(higher[0]) - base) / 2)
    return float(raised)


def calibrate(ok_scores: np.ndarray, ok_peaks: np.ndarray, false_alarm_rate: float = 0.01) -> Thresholds:
    """Thresholds from held-out OK image scores and per-image map maxima."""
    ok_scores = np.asarray(ok_scores, dtype=np.float64)
    ok_peaks = np.asarray(ok_peaks, dtype=np.float64)
    return Thresholds(
        image=quantile_threshold(ok_scores, false_alarm_rate),
        pixel=quantile_threshold(ok_peaks, false_alarm_rate),
        calibration_scores=ok_scores,
        calibration_peaks=ok_peaks,
        target_false_alarm_rate=false_alarm_rate,
    )


def verdict(score: float, threshold: float) -> str:
    """'NG' when the score is above the threshold, else 'OK'."""
    return "NG" if score > threshold else "OK"


#: a held-out OK part scoring this many times the next highest one is named when it sets
#: the image threshold: one unusual part (or a defective one among the OK images) then
#: decides every verdict
LONE_PART_RATIO = 1.2


def resting_part(th: Thresholds) -> int | None:
    """Index (into the held-out scores) of the held-out OK part the image threshold rests on:
    the highest score at or below it; None without held-out scores."""
    scores = th.calibration_scores
    below = np.nonzero(scores <= th.image)[0]
    return int(below[np.argmax(scores[below])]) if below.size else None


def lone_part_text(th: Thresholds | None, calibration: list[str]) -> str:
    """"" or a sentence naming the held-out OK part that alone sets the image threshold, when
    it scores at least :data:`LONE_PART_RATIO` times the next one (found trying the station:
    one held-out cell at 464.9 put the threshold at 465.3 and 11 of 12 defective cells were
    judged OK, and the first fit did not say which part did it)."""
    if th is None or th.calibration_scores.size < 2 or len(calibration) != th.calibration_scores.size:
        return ""
    i = resting_part(th)
    if i is None:
        return ""
    scores = th.calibration_scores
    rest = np.delete(scores, i)
    nxt = float(rest[rest <= scores[i]].max()) if (rest <= scores[i]).any() else 0.0
    if nxt <= 0 or scores[i] < LONE_PART_RATIO * nxt:
        return ""
    name = calibration[i].replace("\\", "/").rsplit("/", 1)[-1]
    return (f"the image threshold rests on one held-out OK part, {name} ({scores[i]:.4g}, "
            f"{scores[i] / nxt:.1f}x the next one): check that it is a good part (if not, remove it from "
            f"the OK images and refit)")
