"""Decision thresholds: calibrated on OK images alone, or best-F1 when defects are known.

With OK images only, the image threshold is the (1 - far) quantile of held-out OK scores,
so the station can state the expected false-alarm rate at any threshold as the fraction of
calibration scores above it. The pixel threshold uses the same rule on per-image map maxima:
a region is outlined exactly where it would make the part NG under max pooling.
"""
from __future__ import annotations

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

    def matches_calibration(self) -> bool:
        """True when both thresholds are what calibration at the target rate gives on the
        stored held-out scores, i.e. nobody set them by hand since."""
        if self.calibration_scores.size == 0 or self.calibration_peaks.size == 0:
            return False
        far = self.target_false_alarm_rate
        return (self.image == quantile_threshold(self.calibration_scores, far)
                and self.pixel == quantile_threshold(self.calibration_peaks, far))


def quantile_threshold(ok_scores: np.ndarray, false_alarm_rate: float) -> float:
    """Smallest threshold with at most ``false_alarm_rate`` of ``ok_scores`` above it."""
    s = np.sort(np.asarray(ok_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no OK scores to calibrate on")
    allowed = int(np.floor(false_alarm_rate * s.size))  # how many may lie above
    return float(s[s.size - 1 - allowed])


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
