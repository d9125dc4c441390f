"""The neighbourhood mean of patch features in numpy, for scoring without PyTorch
(:mod:`core.lean_inspection`): the twin of :func:`core.models.base.local_features`, which
PaDiM's ``neighbourhood`` applies before its Gaussians. Imports no torch."""
from __future__ import annotations

import numpy as np


def _box_sums(x: np.ndarray, size: int) -> np.ndarray:
    """(..., h, w) -> (..., h, w) float64: sums over each size x size window, zeros beyond the
    edges (an integral image: no limit on the number of channels)."""
    r = size // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(r + 1, r), (r + 1, r)]  # one leading zero row and column
    s = np.pad(x.astype(np.float64), pad).cumsum(-2).cumsum(-1)
    return s[..., size:, size:] - s[..., :-size, size:] - s[..., size:, :-size] + s[..., :-size, :-size]


def neighbourhood_mean(emb: np.ndarray, size: int) -> np.ndarray:
    """(B, C, h, w) -> (B, C, h, w) float32: each patch the mean over its size x size
    neighbourhood, only the neighbours that exist counted (PyTorch's ``avg_pool2d`` with
    ``count_include_pad=False``); ``size`` 1: unchanged."""
    if size <= 1:
        return emb
    count = _box_sums(np.ones(emb.shape[-2:]), size)
    return (_box_sums(emb, size) / count).astype(np.float32)
