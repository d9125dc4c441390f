"""One image's result, and how a detector turns patch distances into it (no PyTorch here).

Shared by the detector (:class:`core.detector.Detector`) and inspection without PyTorch
(:mod:`core.lean_inspection`): the same maps, image scores and verdicts from the same
distances.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anomaly_map import PostProcess
from .thresholds import Thresholds, verdict


@dataclass(frozen=True)
class Inspection:
    """The result of inspecting one image. Arrays are read-only snapshots."""

    score: float
    verdict: str  # "OK" | "NG" | "?" (no threshold yet)
    #: (S, S) float32 at the network input resolution; (H, W), the image's own, when tiled
    anomaly_map: np.ndarray
    image_threshold: float | None
    pixel_threshold: float | None

    @property
    def peak(self) -> float:
        return float(self.anomaly_map.max())


def maps_and_scores(distances, post: PostProcess, size: int, thresholds: Thresholds | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(B, h, w) patch distances -> ((B, size, size) float32 maps, (B,) float64 image scores)."""
    maps = post.maps(distances, size)
    return maps, post.scores(maps, thresholds.pixel if thresholds else None)


def judge(score: float, anomaly_map: np.ndarray, thresholds: Thresholds | None) -> Inspection:
    """The verdict on one image (``"?"`` without thresholds); the map becomes read-only."""
    anomaly_map.flags.writeable = False
    th = thresholds
    v = verdict(score, th.image) if th else "?"
    return Inspection(float(score), v, anomaly_map, th.image if th else None, th.pixel if th else None)
