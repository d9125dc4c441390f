"""From patch distances to an anomaly map and an image score.

Patch distances (B, h, w) are upsampled bilinearly to the network input size and smoothed
with a Gaussian (sigma 4 px by default, as in PaDiM). The image score pools the map:

* ``max``  - the highest pixel (PaDiM's choice),
* ``topk`` - the mean of the k highest pixels, robust to single hot pixels,
* ``blob`` - the largest ``area x mean distance`` over connected regions above a level
  (seed notes, section 3.1): a large faint defect outranks a single hot pixel.

Example:
    >>> post = PostProcess(sigma=4.0, pooling="topk", topk=100)
    >>> maps = post.maps(distances, size=224)     # (B, 224, 224) float32
    >>> scores = post.scores(maps)                # (B,) float64
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

POOLINGS = ("max", "topk", "blob")


@dataclass(frozen=True)
class PostProcess:
    sigma: float = 4.0
    pooling: str = "max"
    topk: int = 100
    #: level for ``blob`` pooling; ``None`` uses the detector's pixel threshold
    blob_level: float | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.sigma < 0 or self.topk < 1:
            raise ValueError("sigma must be >= 0 and topk >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    def maps(self, distances, size: int) -> np.ndarray:
        """(B, h, w) patch distances (a numpy array or a CPU torch tensor) -> (B, size, size)
        float32 smoothed anomaly maps. No torch here: inspection without PyTorch uses it too."""
        d = np.ascontiguousarray(np.asarray(distances, dtype=np.float32))
        out = np.empty((d.shape[0], size, size), np.float32)
        k = 2 * int(4.0 * self.sigma + 0.5) + 1  # same kernel extent as anomalib
        for i in range(d.shape[0]):
            # == F.interpolate(bilinear, align_corners=False) to 2e-6, 3x faster
            out[i] = cv2.resize(d[i], (size, size), interpolation=cv2.INTER_LINEAR)
            if self.sigma > 0:
                out[i] = cv2.GaussianBlur(out[i], (k, k), self.sigma, borderType=cv2.BORDER_REFLECT)
        return out

    def scores(self, maps: np.ndarray, pixel_threshold: float | None = None) -> np.ndarray:
        """(B, H, W) maps -> (B,) image scores by the chosen pooling."""
        flat = maps.reshape(maps.shape[0], -1)
        if self.pooling == "max":
            return flat.max(axis=1).astype(np.float64)
        if self.pooling == "topk":
            k = min(self.topk, flat.shape[1])
            part = np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:]
            return part.mean(axis=1).astype(np.float64)
        level = self.blob_level if self.blob_level is not None else pixel_threshold
        if level is None:
            # Before calibration there is no level: fall back to max so calibration can run.
            return flat.max(axis=1).astype(np.float64)
        return np.array([blob_score(m, level) for m in maps], dtype=np.float64)


def blob_score(anomaly_map: np.ndarray, level: float) -> float:
    """max over connected regions above ``level`` of area (px) x mean distance.

    A map with no region above the level scores its maximum scaled to stay below any
    region's score, so the ranking of clean images is still meaningful.
    """
    mask = (anomaly_map > level).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return float(anomaly_map.max()) * 1e-3
    sums = np.bincount(labels.ravel(), weights=anomaly_map.ravel(), minlength=n)[1:]
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    # area x mean distance == sum of distances over the region
    return float((areas * (sums / areas)).max())
