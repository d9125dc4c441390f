"""PaDiM patch embedding: stages upsampled to the finest grid, concatenated, channel subset.

The random channel subset is drawn once from a seeded generator and stored with the model,
so a model file scores identically on any machine. Only the selected channels of each stage
are upsampled (selection commutes with per-channel bilinear upsampling), which saves most of
the embedding's cost when 100 of 176 channels are kept.

Example:
    >>> emb = Embedder(extractor, n_channels=100, seed=0)
    >>> e = emb(batch)     # (B, 100, 28, 28) float32 for Lite0 stages (2, 3) at 224 px
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import BackboneInfo, FeatureExtractor


def choose_channels(total: int, n_channels: int | None, seed: int) -> np.ndarray:
    """Sorted random subset of ``n_channels`` of ``total`` (all of them if None or >= total)."""
    if n_channels is None or n_channels >= total:
        return np.arange(total, dtype=np.int64)
    if n_channels < 1:
        raise ValueError(f"need at least one channel, got {n_channels}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n_channels, replace=False)).astype(np.int64)


class Embedder:
    """Turns a batch of images into per-patch embeddings for the normality models."""

    def __init__(self, extractor: FeatureExtractor | BackboneInfo, channel_idx: np.ndarray) -> None:
        self.extractor = extractor
        total = sum(extractor.stage_channels)
        channel_idx = np.asarray(channel_idx, dtype=np.int64)
        if channel_idx.ndim != 1 or channel_idx.size == 0 or channel_idx.min() < 0 or channel_idx.max() >= total:
            raise ValueError(f"channel indices must lie in 0..{total - 1}")
        self.channel_idx = channel_idx
        # Per-stage local indices, so each stage is sliced before upsampling.
        bounds = np.cumsum((0,) + extractor.stage_channels)
        self._per_stage = [
            torch.from_numpy(channel_idx[(channel_idx >= lo) & (channel_idx < hi)] - lo)
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        #: stage index of each output channel, used by stage fusion and channel-weight reports
        self.channel_stage = np.searchsorted(bounds[1:], channel_idx, side="right")

    @property
    def has_backbone(self) -> bool:
        """False for an exported model loaded without its network (see :mod:`core.bundle`)."""
        return isinstance(self.extractor, FeatureExtractor)

    @property
    def stage_indices(self) -> list[torch.Tensor]:
        """Per stage, the local indices of the kept channels (the exporter bakes these in)."""
        return list(self._per_stage)

    @property
    def n_channels(self) -> int:
        return int(self.channel_idx.size)

    @property
    def grid_size(self) -> tuple[int, int]:
        s = self.extractor.spec.image_size
        stride = self.extractor.stage_strides[0]
        return (-(-s // stride), -(-s // stride))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 RGB in [0, 1] -> (B, C, h, w) float32 embedding."""
        feats = self.extractor(images)
        return combine_stages(feats, self._per_stage, tuple(feats[0].shape[-2:]))


def combine_stages(feats: list[torch.Tensor], per_stage: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Each stage's kept channels, upsampled to ``size`` (bilinear), concatenated in order.

    Shared by :class:`Embedder` and the exported graph (:mod:`core.runtime`), so both compute
    the same thing by construction.
    """
    parts = []
    for f, idx in zip(feats, per_stage):
        if idx.numel() == 0:
            continue
        f = f.index_select(1, idx) if idx.numel() < f.shape[1] else f
        if tuple(f.shape[-2:]) != tuple(size):
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        parts.append(f)
    return torch.cat(parts, dim=1).contiguous()
