"""Trained normality models: a small network learns the OK parts' embeddings, and a part is
scored by how badly the network does on it (reconstruction, inpainting or distillation error).

The seeds' RIAD, FAVAE and KDAD train on pixels on a GPU. Here the network works on the same
patch embeddings every other model sees (the pretrained backbone's stages at the patch grid,
28 x 28 at 224 px): 64 times fewer positions than pixels, so a CPU station trains one in
minutes, and tiling, feedback memory, thresholds, model files and the runtimes stay shared.
Each module (:mod:`.riad`, :mod:`.favae`, :mod:`.kdad`) says what it keeps of its paper.

Training is a job like any other (:meth:`TrainedModel.train`): it yields progress per epoch
(loss, held-out loss), checks the cancel token before every batch, stops early when the
held-out OK images stop improving (``patience`` epochs), never runs past the engineer's time
``budget``, and keeps the epoch that did best on the held-out images. A loss that turns NaN
restores that epoch and halves the learning rate; three in a row end the fit with a clear
error instead of a model that scores NaN.

What a trained model does not do: merge shards exactly (Ray collects the embeddings on the
driver and trains there), learn a click exactly (an added OK region fine-tunes the
network for ``finetune_steps`` steps: ``exact_incremental = False``), or learn channel
weights (see :meth:`TrainedModel.set_channel_weights`). Position-free false-alarm feedback
(:mod:`core.feedback_memory`) works as for every model.
"""
from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Generator
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import Cancelled, OkngError
from .base import NormalityModel

#: seconds of training at most unless the engineer sets ``budget`` (the issue's 10 minutes
#: for 200 images at 224 px on a 2-core CPU)
DEFAULT_BUDGET = 600.0
#: the training loop's clock (a test replaces it to check the time budget without waiting)
_clock = time.perf_counter
#: patches per normalisation pass (float64 sums), bounds the memory of computing mean / std
_NORM_CHUNK = 32


class TrainingDiverged(OkngError):
    """The loss stayed NaN or infinite after lowering the learning rate three times."""


def conv(n_in: int, n_out: int, k: int = 3, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    """Convolution (same padding) + LeakyReLU: the building block of every trained model."""
    return nn.Sequential(nn.Conv2d(n_in, n_out, k, stride=stride, padding=dilation * (k // 2), dilation=dilation),
                         nn.LeakyReLU(0.1))


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, h, w) with two more channels: each patch's row and column in [-1, 1].

    The networks are convolutions, blind to where a patch sits; PaDiM's per-position Gaussians
    show that position matters on parts like solar cells (busbars, edges), so it is an input.
    """
    b, _, h, w = x.shape
    rows = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, rows, cols], dim=1)


class TrainedModel(NormalityModel):
    #: fit_job trains it with progress (:meth:`train`) instead of a plain finalize
    trains: ClassVar[bool] = True
    exact_incremental = False
    supports_channel_weights = False
    #: accepted ranges (lo, hi, whole number), checked by DetectorConfig
    param_ranges: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "width": (8, 512, True), "epochs": (1, 10_000, True), "budget": (1.0, 7 * 86_400.0, False),
        "patience": (1, 1000, True), "lr": (1e-6, 1.0, False), "batch": (1, 1024, True),
        "seed": (0, 2**32 - 1, True), "finetune_steps": (0, 100_000, True),
    }

    def __init__(self, grid: tuple[int, int], n_channels: int, width: int = 64, epochs: int = 200,
                 budget: float = DEFAULT_BUDGET, patience: int = 6, lr: float = 2e-3, batch: int = 8, seed: int = 0,
                 finetune_steps: int = 20) -> None:
        super().__init__(grid, n_channels)
        self.width, self.epochs, self.budget = int(width), int(epochs), float(budget)
        self.patience, self.lr, self.batch, self.seed = int(patience), float(lr), int(batch), int(seed)
        self.finetune_steps = int(finetune_steps)
        self.net = self._seeded(self.build_net)
        #: per-channel mean and standard deviation of the OK embeddings: the network sees
        #: standardised channels, so no channel's scale dominates the loss
        self.mean = torch.zeros(n_channels)
        self.std = torch.ones(n_channels)
        #: OK embeddings (float16) and their patch masks, kept while the station runs (not in
        #: the model file): what training and fine-tuning read
        self._store: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._images = 0
        self._trained = False
        self._fresh = 0  # entries of _store added since the last training or fine-tune
        #: per patch position, mean and spread of the OK parts' distances (see :meth:`score`)
        self.position_mean = torch.zeros(self.grid)
        self.position_std = torch.ones(self.grid)
        #: (epoch, training loss, held-out loss) per epoch of the last training
        self.history: list[tuple[int, float, float]] = []
        #: why the last training stopped: "epochs", "early stop", "time budget"
        self.stop_reason = ""
        #: the learning rate the last training ended with (halved at each NaN loss)
        self.learning_rate = self.lr

    # -- what each model defines -----------------------------------------------------------
    @abstractmethod
    def build_net(self) -> nn.Module:
        """The network, with fresh weights (called under the model's seed)."""

    @abstractmethod
    def loss(self, x: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Training loss of standardised embeddings ``x`` (B, C, h, w); ``weight`` (B, 1, h, w)
        is 1 where a patch counts (0: outside a marked OK region). ``gen`` draws any randomness."""

    @abstractmethod
    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) squared error per channel of :attr:`error_channels`, ``x`` standardised;
        a patch's distance is the root of their (channel-weighted) sum."""

    @property
    def error_channels(self) -> torch.Tensor:
        """Which embedding channels :meth:`errors` returns, in order (all, by default)."""
        return torch.arange(self.n_channels)

    # -- the seam ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"width": self.width, "epochs": self.epochs, "budget": self.budget, "patience": self.patience,
                "lr": self.lr, "batch": self.batch, "seed": self.seed, "finetune_steps": self.finetune_steps}

    @property
    def n_samples(self) -> int:
        return self._images

    def _seeded(self, make):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return make()

    def partial_fit(self, emb: torch.Tensor, patch_mask: torch.Tensor | None = None) -> None:
        emb = emb.detach()
        mask = (torch.ones((emb.shape[0], *emb.shape[-2:]), dtype=torch.bool) if patch_mask is None
                else patch_mask.to(torch.bool).reshape(emb.shape[0], *emb.shape[-2:]))
        keep = mask.reshape(mask.shape[0], -1).any(1)
        if not bool(keep.any()):
            return
        self._store.append((emb[keep].to(torch.float16).clone(), mask[keep].clone()))
        self._images += int(keep.sum())
        self._fresh += 1

    def finalize(self) -> None:
        """Train (first time: the full schedule, without progress) or fine-tune on what was
        added since; nothing when nothing was."""
        if not self._trained:
            if not self._store:
                raise ValueError("no OK embeddings collected before finalize")
            for _ in self.train():
                pass
        elif self._fresh:
            self.fine_tune()

    def standardise(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb.to(torch.float32) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def error_distance(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, h, w): the root of each patch's summed squared errors."""
        self.net.eval()
        with torch.inference_mode():
            return self.errors(self.standardise(emb)).sum(1).clamp_min_(0.0).sqrt_()

    def set_channel_weights(self, weights: torch.Tensor | None) -> None:
        """Refused: a score here is in OK spreads per position (:meth:`score`), measured
        without weights; weighting channels would change every spread, and the reweighting
        guard's rescaling of the weights does not carry over to it."""
        if weights is not None:
            raise ValueError(f"model {self.kind!r} does not learn channel weights (its scores are normalised per "
                             f"position on the OK parts); the feedback memory still learns false alarms")
        self.channel_weights = None

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """How far above what OK parts show *at this position* a patch's error is, in OK
        spreads: a network's error is not the same everywhere (busbars, edges and the part's
        border are harder to reproduce), and PaDiM's per-position statistics are what makes it
        strong on such parts. Measured on poly cells: kdad 0.825 -> 0.869, favae 0.833 ->
        0.875 AUROC against the raw error."""
        if not self._trained:
            self.finalize()
        dist = (self.error_distance(emb) - self.position_mean) / self.position_std
        return torch.nan_to_num(dist, nan=float("inf")).clamp_min_(0.0)

    def _fit_positions(self, *sets: torch.Tensor) -> None:
        """Per-position mean and spread of the OK distances (training and held-out parts);
        each position's variance is blended half with the median one, so 40 parts' noise at
        one position does not make it hair-trigger."""
        d = torch.cat([self.error_distance(x[i : i + _NORM_CHUNK]) for x in sets if x is not None
                       for i in range(0, x.shape[0], _NORM_CHUNK)]).to(torch.float64)
        var = d.var(0) if d.shape[0] > 1 else torch.ones(self.grid, dtype=torch.float64)
        self.position_mean = d.mean(0).to(torch.float32)
        self.position_std = (0.5 * var + 0.5 * var.median()).sqrt().clamp_min(1e-6).to(torch.float32)

    # -- training ---------------------------------------------------------------------------
    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything collected, as one tensor each; the store keeps that one instead of the
        batches, so training holds one copy of the embeddings, not two."""
        if len(self._store) > 1:
            self._store = [(torch.cat([e for e, _ in self._store]), torch.cat([m for _, m in self._store]))]
        return self._store[0]

    def _fit_normalisation(self, data: torch.Tensor, masks: torch.Tensor) -> None:
        c = data.shape[1]
        s1 = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        n = 0.0
        for i in range(0, data.shape[0], _NORM_CHUNK):
            x = data[i : i + _NORM_CHUNK].to(torch.float64)
            w = masks[i : i + _NORM_CHUNK, None].to(torch.float64)
            s1 += (x * w).sum((0, 2, 3))
            s2 += (x * x * w).sum((0, 2, 3))
            n += float(w.sum())
        mean = s1 / max(n, 1.0)
        var = (s2 / max(n, 1.0) - mean * mean).clamp_min(0.0)
        self.mean = mean.to(torch.float32)
        self.std = var.sqrt().clamp_min(1e-3 * float(var.sqrt().max().clamp_min(1e-12))).to(torch.float32)

    def held_out_loss(self, held: torch.Tensor) -> float:
        """Mean loss of held-out OK embeddings under the current network (fixed randomness)."""
        self.net.eval()
        gen = torch.Generator().manual_seed(self.seed + 1)
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, held.shape[0], max(self.batch, 16)):
                x = self.standardise(held[i : i + max(self.batch, 16)])
                w = torch.ones((x.shape[0], 1, *x.shape[-2:]))
                total += float(self.loss(x, w, gen)) * x.shape[0]
                n += x.shape[0]
        return total / max(n, 1)

    def train(self, held: torch.Tensor | None = None, token=None) -> Generator[Any, None, None]:
        """Train from fresh weights on everything collected; yields a :class:`core.jobs.Progress`
        per epoch. ``held``: held-out OK embeddings for early stopping (None: the training
        loss decides). ``token``: a cancel token, checked before every batch."""
        from ..jobs import Progress

        data, masks = self._data()
        self._fit_normalisation(data, masks)
        self.net = self._seeded(self.build_net)
        gen = torch.Generator().manual_seed(self.seed)
        lr = self.lr
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        best, best_state, stale, nan_runs = math.inf, self._state(), 0, 0
        self.history, self.stop_reason = [], "epochs"
        t0 = _clock()
        n = data.shape[0]
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            order = torch.randperm(n, generator=gen)
            total, seen, out_of_time = 0.0, 0, False
            for i in range(0, n, self.batch):
                if token is not None and token.cancelled:
                    raise Cancelled("cancelled")
                if seen and _clock() - t0 > self.budget:  # at least one step per epoch
                    out_of_time = True
                    break
                idx = order[i : i + self.batch]
                x = self.standardise(data[idx])
                loss = self.loss(x, masks[idx, None].to(torch.float32), gen)
                if not torch.isfinite(loss):
                    nan_runs += 1
                    if nan_runs >= 3:
                        raise TrainingDiverged(
                            f"training {self.kind} diverged (the loss became NaN three times, down to learning "
                            f"rate {lr:.3g}): lower lr (--param lr=...) or check the OK images")
                    self.net.load_state_dict(best_state)
                    lr /= 2.0
                    opt = torch.optim.Adam(self.net.parameters(), lr=lr)
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
                opt.step()
                total += float(loss.detach()) * idx.numel()
                seen += idx.numel()
                nan_runs = 0  # "in a row": a good step ends the run of bad ones
            if seen == 0:  # every batch was NaN (rate lowered) or the budget was spent
                if out_of_time:
                    self.stop_reason = "time budget"
                    break
                continue
            train_loss = total / max(seen, 1)
            val = self.held_out_loss(held) if held is not None and held.shape[0] else train_loss
            self.history.append((epoch, train_loss, val))
            if val < best * (1.0 - 1e-4):
                best, best_state, stale = val, self._state(), 0
            else:
                stale += 1
            elapsed = _clock() - t0
            yield Progress(epoch, self.epochs, f"training {self.kind}: epoch {epoch}/{self.epochs}, held-out loss "
                                               f"{val:.3g} (training {train_loss:.3g}), {elapsed:.0f} of "
                                               f"{self.budget:.0f} s", unit="epoch")
            if out_of_time or elapsed + elapsed / epoch > self.budget:
                self.stop_reason = "time budget"
                break
            if stale >= self.patience:
                self.stop_reason = "early stop"
                break
        if not math.isfinite(best):
            raise TrainingDiverged(f"training {self.kind} gave no finite loss: lower lr (--param lr=...)")
        self.net.load_state_dict(best_state)
        self.net.eval()
        self.learning_rate = lr
        self._fit_positions(data, held)
        self._trained, self._fresh = True, 0

    def fine_tune(self) -> None:
        """Steps on the embeddings added since training (an OK region the operator marked),
        each batch half new, half replayed from the training set (while the station holds
        it): the network learns the region without forgetting the rest."""
        new = self._store[-self._fresh :]
        old = self._store[: -self._fresh]
        self._fresh = 0
        if not self.finetune_steps or not new:
            return
        data = torch.cat([e for e, _ in new])
        masks = torch.cat([m for _, m in new])
        replay = (torch.cat([e for e, _ in old]), torch.cat([m for _, m in old])) if old else None
        gen = torch.Generator().manual_seed(self.seed + 2)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        before = self._state()
        half = max(1, self.batch // 2)
        self.net.train()
        for _ in range(self.finetune_steps):
            idx = torch.randint(0, data.shape[0], (min(half, data.shape[0]),), generator=gen)
            # the marked region weighs as much as the replayed parts, however few its patches
            loss = self.loss(self.standardise(data[idx]), masks[idx, None].to(torch.float32), gen)
            if replay is not None:
                r = torch.randint(0, replay[0].shape[0], (half,), generator=gen)
                loss = loss + self.loss(self.standardise(replay[0][r]), replay[1][r, None].to(torch.float32), gen)
            if not torch.isfinite(loss):
                self.net.load_state_dict(before)  # keep the trained network rather than a broken one
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
            opt.step()
        self.net.eval()

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    # -- persistence ------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        if not self._trained or self._fresh:
            self.finalize()
        t = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        t.update({"norm.mean": self.mean, "norm.std": self.std, "position.mean": self.position_mean,
                  "position.std": self.position_std, "n_images": torch.tensor([self._images], dtype=torch.int64)})
        return t

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[4:]: v.to(torch.float32) for k, v in tensors.items() if k.startswith("net.")}
        self.net.load_state_dict(state)
        self.net.eval()
        self.mean = tensors["norm.mean"].to(torch.float32).clone()
        self.std = tensors["norm.std"].to(torch.float32).clone()
        self.position_mean = tensors["position.mean"].to(torch.float32).clone()
        self.position_std = tensors["position.std"].to(torch.float32).clone()
        self._images = int(tensors["n_images"].reshape(-1)[0])
        self._trained, self._fresh, self._store = True, 0, []

    def expected_shapes(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        shapes = {f"net.{k}": tuple(v.shape) for k, v in self.net.state_dict().items()}
        shapes.update({"norm.mean": (self.n_channels,), "norm.std": (self.n_channels,), "position.mean": self.grid,
                       "position.std": self.grid, "n_images": (1,)})
        return shapes

    def copy(self) -> TrainedModel:
        clone = type(self)(self.grid, self.n_channels, **self.params())
        clone.net.load_state_dict(self._state())
        clone.net.eval()
        clone.mean, clone.std = self.mean.clone(), self.std.clone()
        clone.position_mean, clone.position_std = self.position_mean.clone(), self.position_std.clone()
        clone._store = list(self._store)  # the stored tensors are never changed in place: shared
        clone._images, clone._trained, clone._fresh = self._images, self._trained, self._fresh
        clone.history, clone.stop_reason = list(self.history), self.stop_reason
        return clone


def masked_mse_cosine(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error per channel plus (1 - cosine similarity) per patch, both averaged
    over the patches that count (``weight`` (B, 1, h, w)): the distillation loss of KDAD and
    the reconstruction loss used here for RIAD and FAVAE."""
    w = weight[:, 0]
    denom = w.sum().clamp_min(1.0)
    mse = ((pred - target) ** 2).mean(1)
    cos = 1.0 - nn.functional.cosine_similarity(pred, target, dim=1, eps=1e-6)
    return ((mse + cos) * w).sum() / denom
