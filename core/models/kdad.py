"""KDAD, in the embedding space: a student distils the teacher's deepest stage.

What the seed keeps of the paper (Salehi et al., "Multiresolution knowledge distillation for
anomaly detection", CVPR 2021): a pretrained teacher, a smaller student trained only on OK
parts to give the teacher's activations, and the discrepancy between the two (squared error
plus cosine distance) as the anomaly score. On an OK part the student has learnt to follow
the teacher; on a defect it has never seen, it does not. Here the student does not start from
pixels but from the teacher's earlier stage(s) in the embedding, and predicts the teacher's
last stage (the deeper, more semantic one) patch by patch: it replaces that stage of the
teacher, learnt on OK parts only. It needs channels from at least two stages (the default,
Lite0 stages 2 and 3 with all their 152 channels).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .trained import DEFAULT_BUDGET, TrainedModel, conv, masked_mse_cosine, with_coordinates


class _Student(nn.Module):
    def __init__(self, n_in: int, n_out: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(n_in + 2, width), conv(width, width), conv(width, width, dilation=2),
                                  conv(width, width), nn.Conv2d(width, n_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(with_coordinates(x))


class KdadModel(TrainedModel):
    kind = "kdad"
    summary = "student network distils the backbone's last stage from the earlier ones (KDAD; trained)"
    default_channels = None  # every channel: the student's input and its target are whole stages
    needs_channel_stage = True
    param_ranges = {**TrainedModel.param_ranges, "channel_stage": (0, 9, True)}

    def __init__(self, grid: tuple[int, int], n_channels: int, channel_stage: list[int] | None = None,
                 width: int = 64, epochs: int = 200, budget: float = DEFAULT_BUDGET, patience: int = 6,
                 lr: float = 2e-3, batch: int = 8, seed: int = 0, finetune_steps: int = 20) -> None:
        stages = list(range(n_channels)) if channel_stage is None else [int(s) for s in channel_stage]
        if len(stages) != n_channels:
            raise ValueError(f"channel_stage has {len(stages)} entries for {n_channels} channels")
        last = max(stages) if stages else 0
        self.channel_stage = None if channel_stage is None else stages
        self._source = torch.tensor([i for i, s in enumerate(stages) if s < last], dtype=torch.int64)
        self._target = torch.tensor([i for i, s in enumerate(stages) if s == last], dtype=torch.int64)
        if channel_stage is None or not self._source.numel():
            raise ValueError("model 'kdad' needs channels from at least two backbone stages (the student learns "
                             "the last stage from the earlier ones): use --stages with two or more stages")
        super().__init__(grid, n_channels, width=width, epochs=epochs, budget=budget, patience=patience, lr=lr,
                         batch=batch, seed=seed, finetune_steps=finetune_steps)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "channel_stage": self.channel_stage}

    @property
    def error_channels(self) -> torch.Tensor:
        return self._target

    def build_net(self) -> nn.Module:
        return _Student(self._source.numel(), self._target.numel(), self.width)

    def loss(self, x: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return masked_mse_cosine(self.net(x[:, self._source]), x[:, self._target], weight)

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x[:, self._source]) - x[:, self._target]) ** 2
