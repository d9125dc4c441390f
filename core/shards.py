"""A fit split into shards of OK images, merged into the model a local fit builds.

This is the arithmetic of ``okng fit --ray`` (:mod:`core.ray_fit`), free of Ray so that it
can be tested and reused without a cluster. :func:`fit_shard` runs where a shard's images
are (a Ray worker); :func:`merge_shard` runs on the driver, in shard order. How a shard is
carried depends on the model:

* ``stats`` (padim, padim-lowrank, padim-fusion): the shard's streamed Gaussian statistics
  (count, mean, scatter per patch; the low-rank model's mean of the unprojected embedding).
  They merge exactly (Chan et al.), so the merged model equals a local fit up to float64
  rounding (~1e-13 relative).
* ``embeddings`` (padim-kmeans, and any model not listed): the shard's embeddings, fed to
  the driver's model in order. k-means needs every embedding at once, so only the backbone
  is distributed and the clustering runs on the driver, on exactly the local fit's data:
  the result is the local fit's. The driver holds all embeddings, as a local fit does.
* ``coreset`` (patchcore): each shard keeps a k-center coreset of its own patches,
  :data:`CORESET_OVERSAMPLE` times larger than its share; the driver picks the final
  coreset (the local fit's size) from their union. Approximate: k-center greedy over a
  union of coresets is not the greedy over all patches (tests/core/test_shards.py bounds
  the difference in scores and AUROC).

Shards are cut at multiples of the batch size, so every backbone pass sees the batch a
local fit gives it: with the same number of threads the embeddings are bit for bit the
local ones (PyTorch's float32 sums depend on the thread count, ~1e-6 relative).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .backbone import FeatureExtractor
from .config import model_default
from .detector import Detector, DetectorConfig
from .jobs import Skipped, iter_batches
from .models.gaussian import GaussianStats

#: how each model's shard travels (see the module docstring); others: "embeddings"
STRATEGY = {"padim": "stats", "padim-lowrank": "stats", "padim-fusion": "stats", "patchcore": "coreset"}
#: a PatchCore shard keeps this many times its share of the final coreset
CORESET_OVERSAMPLE = 2.0

FIT, HELD_OUT = "fit", "held-out"


def strategy(kind: str) -> str:
    return STRATEGY.get(kind, "embeddings")


@dataclass
class ShardResult:
    """What a shard sends back: small enough to pickle, no model object."""

    role: str  # FIT or HELD_OUT
    #: FIT: the model's shard state (see the module docstring); HELD_OUT: {"embeddings": float16}
    state: dict[str, torch.Tensor]
    fitted: list[str] = field(default_factory=list)  # readable paths, in order
    skipped: list[Skipped] = field(default_factory=list)


def plan(paths: list[str], batch_size: int, n_shards: int) -> list[list[str]]:
    """At most ``n_shards`` consecutive shards, each a whole number of batches."""
    if not paths:
        return []
    batches = math.ceil(len(paths) / batch_size)
    per = math.ceil(batches / max(1, min(n_shards, batches))) * batch_size
    return [paths[i : i + per] for i in range(0, len(paths), per)]


def shard_config(config: DetectorConfig) -> DetectorConfig:
    """The settings a FIT shard's model is built with: PatchCore's shard coreset is larger."""
    if strategy(config.model) != "coreset":
        return config
    from .models.patchcore import PatchcoreModel

    params = dict(config.model_params)
    ratio = float(params.get("coreset_ratio", model_default(PatchcoreModel, "coreset_ratio")))
    params["coreset_ratio"] = min(1.0, ratio * CORESET_OVERSAMPLE)
    return config.with_(model_params=params)


def fit_shard(config: DetectorConfig, paths: list[str], role: str,
              extractor: FeatureExtractor | None = None) -> ShardResult:
    """Embed one shard's images (PyTorch, like a local fit) and return its state."""
    det = Detector.create(shard_config(config) if role == FIT else config, extractor)
    how = strategy(config.model) if role == FIT else "held"
    out = ShardResult(role, {})
    kept: list[torch.Tensor] = []
    for batch in iter_batches(paths, det.image_size, config.batch_size, bit_depth=config.bit_depth,
                              contrast=config.contrast):
        out.skipped += batch.skipped
        if batch.tensor is None:
            continue
        emb = det.embed_torch(batch.tensor)
        out.fitted += batch.paths
        if how == "held":
            kept.append(emb.to(torch.float16))
        elif how == "embeddings":
            kept.append(emb)
        else:
            det.model.partial_fit(emb)
    if how in ("held", "embeddings"):
        out.state = {"embeddings": torch.cat(kept)} if kept else {}
    elif out.fitted:
        if how == "coreset":
            det.model.finalize()
        out.state = {k: v.clone() for k, v in det.model.tensors().items()}
    return out


def merge_shard(model, state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor] | None
                ) -> dict[str, torch.Tensor] | None:
    """Fold one FIT shard's state into the driver's running merge (shard order).

    ``stats`` and ``coreset`` shards accumulate in the returned dict (pass it back in, then
    :func:`finish`); ``embeddings`` shards go straight into ``model.partial_fit``."""
    if not state:
        return merged
    how = strategy(model.kind)
    if how == "embeddings":
        model.partial_fit(state["embeddings"])
        return merged
    if merged is None:
        return {k: v.clone() for k, v in state.items()}
    if how == "coreset":
        return {"bank": torch.cat([merged["bank"], state["bank"]]), "n_images": merged["n_images"] + state["n_images"]}
    return _merge_gaussians(merged, state)


def _merge_gaussians(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chan's pairwise merge of every ``[prefix]count/mean/scatter`` group (one for PaDiM and
    the low-rank model, one per stage for fusion), plus the low-rank model's ``mean_x``."""
    out = dict(a)
    for key in [k for k in a if k.endswith("count")]:
        pre = key[: -len("count")]
        acc = GaussianStats(*(a[pre + n].clone() for n in ("count", "mean", "scatter")))
        n_b = b[pre + "count"]
        if pre + "mean_x" in a:
            frac = (n_b / (acc.count + n_b).clamp_min(1.0))[:, None]
            out[pre + "mean_x"] = a[pre + "mean_x"] + (b[pre + "mean_x"] - a[pre + "mean_x"]) * frac
        acc.merge(GaussianStats(n_b, b[pre + "mean"], b[pre + "scatter"]))
        out[pre + "count"], out[pre + "mean"], out[pre + "scatter"] = acc.count, acc.mean, acc.scatter
    return out


def finish(model, merged: dict[str, torch.Tensor] | None, n_patches_total: int) -> None:
    """Load the merged state into the driver's (empty) model. ``n_patches_total``: patches
    of all fitted images, which sets PatchCore's final coreset size as in a local fit."""
    how = strategy(model.kind)
    if how == "embeddings" or merged is None:
        return
    if how == "coreset":
        n_pick = max(1, int(round(model.coreset_ratio * n_patches_total)))
        merged = {"bank": model.coreset(merged["bank"], n_pick), "n_images": merged["n_images"]}
    model.load_tensors(merged)
