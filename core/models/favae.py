"""FAVAE, in the embedding space: a variational auto-encoder of the pretrained features.

What the seed keeps of the paper (Dehaene & Eline, "Anomaly localization by modeling
perceptual features", 2020): the decoder's output is held to the pretrained network's
features (the "feature-adaptive" loss), the latent code is pushed towards N(0, I) (KL term),
and the anomaly map is the per-patch feature reconstruction error. Here the features *are*
the input: the encoder sees the patch embedding, squeezes it through a 16-channel latent at
half the grid, and the decoder must give the embedding back. OK parts are reconstructed
well; a defect, never seen in training, comes back as the nearest OK appearance, and the
difference is its score. The paper's pixel-reconstruction branch is left out (the pixels are
not on this seam; the feature term is what localises).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .trained import DEFAULT_BUDGET, TrainedModel, conv, masked_mse_cosine, with_coordinates


class _Vae(nn.Module):
    def __init__(self, channels: int, width: int, latent: int) -> None:
        super().__init__()
        self.encode = nn.Sequential(conv(channels + 2, width), conv(width, width, stride=2))
        self.to_latent = nn.Conv2d(width, 2 * latent, 1)
        self.decode_in = conv(latent + 2, width, k=1)
        self.decode = nn.Sequential(conv(width, width), conv(width, width), nn.Conv2d(width, channels, 1))

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_latent(self.encode(with_coordinates(x))).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def reconstruct(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h = self.decode_in(with_coordinates(z))
        return self.decode(F.interpolate(h, size=size, mode="bilinear", align_corners=False))


class FavaeModel(TrainedModel):
    kind = "favae"
    summary = "variational auto-encoder of the pretrained features, reconstruction error (FAVAE; trained)"
    param_ranges = {**TrainedModel.param_ranges, "latent": (1, 256, True), "beta": (0.0, 10.0, False)}

    def __init__(self, grid: tuple[int, int], n_channels: int, latent: int = 16, beta: float = 0.01,
                 width: int = 64, epochs: int = 200, budget: float = DEFAULT_BUDGET, patience: int = 6,
                 lr: float = 2e-3, batch: int = 8, seed: int = 0, finetune_steps: int = 20) -> None:
        self.latent_channels, self.beta = int(latent), float(beta)
        super().__init__(grid, n_channels, width=width, epochs=epochs, budget=budget, patience=patience, lr=lr,
                         batch=batch, seed=seed, finetune_steps=finetune_steps)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "latent": self.latent_channels, "beta": self.beta}

    def build_net(self) -> nn.Module:
        return _Vae(self.n_channels, self.width, self.latent_channels)

    def loss(self, x: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mu, logvar = self.net.latent(x)
        noise = torch.randn(mu.shape, generator=gen) if self.net.training else torch.zeros_like(mu)
        z = mu + noise * (0.5 * logvar).exp()
        recon = self.net.reconstruct(z, tuple(x.shape[-2:]))
        kl = 0.5 * (mu * mu + logvar.exp() - logvar - 1.0).mean()
        return masked_mse_cosine(recon, x, weight) + self.beta * kl

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.net.latent(x)  # the mean code: scoring is deterministic
        return (self.net.reconstruct(mu, tuple(x.shape[-2:])) - x) ** 2
