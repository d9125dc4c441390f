"""Regions above the pixel threshold: outlines to draw and masks to click on."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Region:
    label: int
    area: int  # pixels in map coordinates
    mean: float
    peak: float
    bbox: tuple[int, int, int, int]  # x, y, w, h in map coordinates
    contour: np.ndarray  # (N, 2) int32 x, y points of the outer outline
    mask: np.ndarray  # (H, W) bool


def find_regions(anomaly_map: np.ndarray, level: float, min_area: int = 4) -> list[Region]:
    """Connected regions of ``anomaly_map > level``, largest score mass first."""
    mask = (anomaly_map > level).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    for lab in range(1, n):
        area = int(stats[lab, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        m = labels == lab
        vals = anomaly_map[m]
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=len).reshape(-1, 2).astype(np.int32)
        x, y, w, h = (int(v) for v in stats[lab, :4])
        regions.append(Region(lab, area, float(vals.mean()), float(vals.max()), (x, y, w, h), contour, m))
    regions.sort(key=lambda r: r.area * r.mean, reverse=True)
    return regions


def region_at(regions: list[Region], row: int, col: int) -> Region | None:
    """The region covering pixel (row, col) of the map, if any."""
    for r in regions:
        if 0 <= row < r.mask.shape[0] and 0 <= col < r.mask.shape[1] and r.mask[row, col]:
            return r
    return None
