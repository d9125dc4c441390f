"""Stage fusion: one PaDiM Gaussian per patch and per backbone stage, maps fused by weight.

Concatenating all stages into one vector lets the widest (or noisiest) stage dominate the
Mahalanobis distance. Here the channels of each feature stage get their own Gaussian per
patch and their own distance map ``d_s``; the maps are fused as

    score = sum_s  w_s * d_s / t_s   /   sum_s w_s

where ``t_s`` is the stage's typical OK distance: the root mean square, over patches and
fitted OK samples, of the in-sample Mahalanobis distance. It follows exactly from the
streamed statistics (``mean d^2 = trace(P S) / n`` with P the precision, S the scatter), so
the model stays exactly incremental. (In-sample distances are smaller than those of unseen
OK parts; the normaliser only has to put the stages on a comparable scale.)

The model needs to know the stage of each embedding channel: ``channel_stage`` (one int
per channel, from :attr:`core.embedding.Embedder.channel_stage`) is passed in by
:meth:`core.detector.Detector.create` (``needs_channel_stage``) and stored in the model
file's parameters. ``stage_weights`` lists one weight per stage present, in stage order
(default: equal weights).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import NormalityModel
from .mahalanobis import trace_of_product
from .padim import PadimModel


class StageFusionModel(NormalityModel):
    kind = "padim-fusion"
    summary = "one Gaussian per patch per backbone stage, distance maps fused by weight"
    exact_incremental = True
    uses_mahalanobis = True
    #: Detector.create passes ``channel_stage`` (the stage of each embedding channel)
    needs_channel_stage = True
    #: accepted ranges (lo, hi, whole number; lists: each item), checked by DetectorConfig
    param_ranges = {"stage_weights": (0.0, 1e6, False), "channel_stage": (0, 9, True), "epsilon": (1e-8, 1e4, False)}

    def __init__(self, grid: tuple[int, int], n_channels: int, channel_stage: list[int] | None = None,
                 stage_weights: list[float] | None = None, epsilon: float = 0.01) -> None:
        super().__init__(grid, n_channels)
        stage = [0] * self.n_channels if channel_stage is None else [int(s) for s in channel_stage]
        if len(stage) != self.n_channels:
            raise ValueError(f"channel_stage has {len(stage)} entries for {self.n_channels} channels")
        self.channel_stage = stage
        self.stages = sorted(set(stage))
        if stage_weights is None:
            weights = [1.0] * len(self.stages)
        else:
            weights = [float(w) for w in stage_weights]
        if len(weights) != len(self.stages) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"stage_weights needs {len(self.stages)} non-negative numbers (one per stage "
                             f"{self.stages}) that are not all zero, got {stage_weights}")
        self.stage_weights = None if stage_weights is None else weights
        self._w = weights
        st = torch.tensor(stage, dtype=torch.int64)
        self._idx = [torch.nonzero(st == s).flatten() for s in self.stages]
        self.parts = [PadimModel(grid, int(i.numel()), epsilon) for i in self._idx]
        self.epsilon = float(epsilon)
        #: per-stage typical OK distance (set by finalize)
        self.typical: list[float] | None = None

    def params(self) -> dict[str, Any]:
        return {"channel_stage": list(self.channel_stage), "stage_weights": self.stage_weights,
                "epsilon": self.epsilon}

    @property
    def n_samples(self) -> int:
        return self.parts[0].n_samples

    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        for idx, part in zip(self._idx, self.parts):
            part.partial_fit(emb.index_select(1, idx), patch_mask)
        self.typical = None

    def finalize(self) -> None:
        typical = []
        for part in self.parts:
            part.finalize()
            assert part._precision is not None
            s = part.stats
            # mean squared in-sample distance per patch: trace(P @ S) / n (P, S symmetric)
            tr = trace_of_product(part._precision, s.scatter) / s.count.clamp_min(1.0)
            typical.append(max(float(tr.mean().clamp_min(0.0).sqrt()), 1e-12))
        self.typical = typical

    def stage_maps(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """Per-stage distance maps (B, h, w), unnormalised, in stage order."""
        return [part.score(emb.index_select(1, idx)) for idx, part in zip(self._idx, self.parts)]

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        if self.typical is None:
            self.finalize()
        assert self.typical is not None
        total = sum(self._w)
        out = torch.zeros(emb.shape[0], *self.grid, dtype=torch.float32)
        for w, t, d in zip(self._w, self.typical, self.stage_maps(emb)):
            if w > 0:
                out += (w / (t * total)) * d
        return out

    def set_channel_weights(self, weights: torch.Tensor | None) -> None:
        super().set_channel_weights(weights)
        for idx, part in zip(self._idx, self.parts):
            part.set_channel_weights(None if self.channel_weights is None else self.channel_weights[idx])

    def copy(self) -> StageFusionModel:
        clone = StageFusionModel(self.grid, self.n_channels, **self.params())
        clone.parts = [p.copy() for p in self.parts]
        clone.typical = None if self.typical is None else list(self.typical)
        clone.set_channel_weights(None if self.channel_weights is None else self.channel_weights.clone())
        return clone

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"stage{s}.{k}": v for s, part in zip(self.stages, self.parts) for k, v in part.tensors().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for s, part in zip(self.stages, self.parts):
            part.load_tensors({k: tensors[f"stage{s}.{k}"] for k in ("count", "mean", "scatter")})
        self.typical = None

    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {f"stage{s}.{k}": shape for s, part in zip(self.stages, self.parts)
                for k, shape in part.expected_shapes(tensors).items()}
