"""RIAD, in the embedding space: reconstruction by inpainting.

What the seed keeps of the paper (Zavrtanik et al., "Reconstruction by inpainting for visual
anomaly detection", Pattern Recognition 2021): the part is cut into a grid of k x k cells,
the cells are split at random into ``n`` = 3 disjoint sets, each set is hidden in turn and
inpainted from the rest, and the three inpainted pieces make one reconstruction; k is drawn
from several sizes in training and every size is used (averaged) at inspection. A network that
never sees the patch it reconstructs cannot copy an anomaly through; it paints what OK parts
have there. Here the cells are cells of the patch grid (k in 2, 4, 7 patches: 16, 32, 56 px at
224 px) and the painted values are the pretrained features, so the paper's image losses
(gradient-magnitude similarity, SSIM) become their feature counterparts: squared error and
cosine distance per patch. The network is a stack of dilated convolutions (receptive field
31 patches, wider than the largest hidden cell) rather than a U-Net: the grid is 28 x 28.
"""
from __future__ import annotations

import math
import torch
from torch import nn

from .trained import TrainedModel, conv, masked_mse_cosine, with_coordinates

#: cell sizes (patches) of the hidden grid; each set of cells is hidden once per size
CELL_SIZES = (2, 4, 7)
#: disjoint sets the cells are split into
N_SETS = 3


class _Inpainter(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(channels + 3, width), conv(width, width, dilation=2),
                                  conv(width, width, dilation=4), conv(width, width, dilation=8),
                                  conv(width, width), nn.Conv2d(width, channels, 1))

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.body(with_coordinates(torch.cat([x * visible, visible], dim=1)))


def hidden_sets(size: tuple[int, int], k: int, gen: torch.Generator) -> torch.Tensor:
    """(N_SETS, h, w) float: 1 where a patch is hidden in that set; every patch in exactly one.
    Cells of k x k patches are dealt to the sets in a random order (``gen``)."""
    h, w = size
    ch, cw = math.ceil(h / k), math.ceil(w / k)
    owner = torch.randperm(ch * cw, generator=gen) % N_SETS
    cells = owner.view(ch, cw).repeat_interleave(k, 0).repeat_interleave(k, 1)[:h, :w]
    return torch.stack([(cells == s).to(torch.float32) for s in range(N_SETS)])


class RiadModel(TrainedModel):
    kind = "riad"
    summary = "inpaints hidden cells of the part from the rest, inpainting error (RIAD; trained)"

    def build_net(self) -> nn.Module:
        return _Inpainter(self.n_channels, self.width)

    def inpaint(self, x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        """Each set of k x k cells hidden in turn, inpainted, and the pieces put together."""
        hidden = hidden_sets(tuple(x.shape[-2:]), k, gen)  # (S, h, w)
        b = x.shape[0]
        xs = x.repeat(N_SETS, 1, 1, 1)
        visible = (1.0 - hidden).repeat_interleave(b, 0)[:, None]
        out = self.net(xs, visible) * (1.0 - visible)
        return out.view(N_SETS, b, *x.shape[1:]).sum(0)

    def loss(self, x: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.net.training:
            k = CELL_SIZES[int(torch.randint(len(CELL_SIZES), (1,), generator=gen))]
            return masked_mse_cosine(self.inpaint(x, k, gen), x, weight)
        return sum(masked_mse_cosine(self.inpaint(x, k, gen), x, weight) for k in CELL_SIZES) / len(CELL_SIZES)

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        # the same hidden cells for every image: a part scores the same alone or in a batch
        gen = torch.Generator().manual_seed(self.seed)
        return sum((self.inpaint(x, k, gen) - x) ** 2 for k in CELL_SIZES) / len(CELL_SIZES)
