"""Compare the station's normality models on ELPV cells (run on purpose; not a test).

    nice -n 10 .venv/bin/python benchmarks/bench_models.py [--kind mono|poly] [--train 200] [--eval 150] \
        [--contrast stretch|flatten]

Fit on ``demo_split(kind=...).ok_train`` (200 OK cells), evaluate on ``eval_ok[:150]`` +
``eval_ng[:150]`` of the same cell type (mono by default; poly: the varied good parts).
Image score = the detector's own post-processing (blur sigma 4, max pooling by default).
Every row uses the same backbone (default recipe: Lite0, stages 2+3, 224 px, grey levels as
recorded unless ``--contrast`` says otherwise, then for every row); the images
are embedded ONCE with all channels and each model gets its own channel subset sliced from
that (identical to embedding with the subset), so the table compares models, not backbone
runs.

Columns:
- AUROC: image-level, OK vs NG (:func:`core.metrics.auroc`).
- fit s: partial_fit over the 200 embeddings (batches of 16) + finalize; excludes embedding.
  Trained models (riad, favae, kdad) train on the fit share and stop early on the held-out
  share, as ``okng fit`` does (so they see 20 % fewer OK images); fit s is the training.
- score ms: model + post-processing per image at batch size 1 (median over 40 images).
- total ms: score ms + the backbone's embedding time per image at batch 1 (shared by all).
- file MB: ``save_detector`` output (no calibration embeddings).

One function per row (``ROWS``); each takes the shared :class:`Data` and returns a
:class:`Row`, so another model (e.g. anomalib's PatchCore) is one more function.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.demo import demo_split  # noqa: E402
from core.detector import Detector, DetectorConfig  # noqa: E402
from core.imageio import load_image  # noqa: E402
from core.jobs import split_calibration  # noqa: E402
from core.metrics import auroc  # noqa: E402
from core.persistence import save_detector  # noqa: E402


@dataclass
class Data:
    train_paths: list[str]
    eval_paths: list[str]
    labels: np.ndarray  # 1 = NG
    base: DetectorConfig  # default recipe, all channels
    det_full: Detector  # unfitted, all channels (holds the loaded backbone)
    train_emb: torch.Tensor  # (N, C_all, h, w)
    eval_emb: torch.Tensor
    embed_ms: float  # backbone + embedding per image, batch 1


@dataclass
class Row:
    model: str
    auroc: float
    fit_s: float
    score_ms: float
    total_ms: float
    file_mb: float


def load_data(n_train: int = 200, n_eval: int = 150, kind: str = "mono", contrast: str | None = None) -> Data:
    split = demo_split(kind=kind)
    train = split.ok_train[:n_train]
    evals = split.eval_ok[:n_eval] + split.eval_ng[:n_eval]
    labels = np.array([0] * len(split.eval_ok[:n_eval]) + [1] * len(split.eval_ng[:n_eval]))
    base = DetectorConfig(n_channels=None, contrast=contrast)
    det = Detector.create(base)

    def embed(paths: list[str]) -> torch.Tensor:
        return torch.cat([det.embed([load_image(p) for p in paths[i : i + 16]]) for i in range(0, len(paths), 16)])

    t0 = time.perf_counter()
    train_emb = embed(train)
    print(f"embedded {len(train)} train images in {time.perf_counter() - t0:.1f} s", flush=True)
    eval_emb = embed(evals)
    imgs = [load_image(p) for p in evals[:20]]
    times = []
    for img in imgs:
        t = time.perf_counter()
        det.embed([img])
        times.append(time.perf_counter() - t)
    return Data(train, evals, labels, base, det, train_emb, eval_emb, 1000 * statistics.median(times))


def bench(data: Data, label: str, config: DetectorConfig,
          image_score: Callable[[Detector, torch.Tensor], np.ndarray] | None = None) -> Row:
    """Fit ``config``'s model on the shared embeddings and measure it."""
    det = Detector.create(config, data.det_full.extractor)
    idx = torch.from_numpy(det.embedder.channel_idx)
    train = data.train_emb.index_select(1, idx)
    t0 = time.perf_counter()
    if getattr(det.model, "trains", False):
        # as okng fit does: the held-out share of the OK images stops the training early
        fit, held = split_calibration(data.train_paths, config.calibration_fraction)
        rows = {p: i for i, p in enumerate(data.train_paths)}
        fit_rows, held_rows = [rows[p] for p in fit], [rows[p] for p in held]
        for i in range(0, len(fit_rows), 16):
            det.fit_embeddings(train[fit_rows[i : i + 16]])
        for _ in det.model.train(train[held_rows]):
            pass
        print(f"  {label}: {len(det.model.history)} epochs, stopped by {det.model.stop_reason}", flush=True)
    else:
        for i in range(0, train.shape[0], 16):
            det.fit_embeddings(train[i : i + 16])
    det.finalize()
    fit_s = time.perf_counter() - t0
    del train
    ev = data.eval_emb.index_select(1, idx)
    scores = []
    for i in range(0, ev.shape[0], 16):
        chunk = ev[i : i + 16]
        scores.append(image_score(det, chunk) if image_score else det.maps_and_scores(chunk)[1])
    auc = auroc(data.labels, np.concatenate(scores))
    lat = []
    for i in range(min(40, ev.shape[0])):
        t = time.perf_counter()
        if image_score:
            image_score(det, ev[i : i + 1])
        else:
            det.maps_and_scores(ev[i : i + 1])
        lat.append(time.perf_counter() - t)
    score_ms = 1000 * statistics.median(lat)
    with tempfile.TemporaryDirectory() as tmp:
        size = os.path.getsize(save_detector(det, Path(tmp) / "m.okng")) / 1e6
    return Row(label, auc, fit_s, score_ms, score_ms + data.embed_ms, size)


def row_padim(data: Data) -> Row:
    return bench(data, "padim", data.base.with_(model="padim", n_channels=100))


def row_padim_neighbourhood(data: Data) -> Row:
    return bench(data, "padim neighbourhood=3", data.base.with_(model="padim", n_channels=100,
                                                                model_params={"neighbourhood": 3}))


def row_patchcore(data: Data) -> Row:
    return bench(data, "patchcore", data.base.with_(model="patchcore", n_channels=100))


def row_patchcore_reweighted(data: Data) -> Row:
    """PatchCore with the paper's image-score reweighting (eq. 7) instead of map pooling."""

    def score(det: Detector, emb: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return det.model.image_scores(emb).numpy()

    return bench(data, "patchcore (eq.7 image score)", data.base.with_(model="patchcore", n_channels=100), score)


def row_kmeans(data: Data) -> Row:
    return bench(data, "padim-kmeans (K=3)", data.base.with_(model="padim-kmeans", n_channels=100))


def row_lowrank(data: Data) -> Row:
    return bench(data, "padim-lowrank (152->100)", data.base.with_(model="padim-lowrank", n_channels=None))


def row_fusion(data: Data) -> Row:
    return bench(data, "padim-fusion", data.base.with_(model="padim-fusion", n_channels=100))


def row_riad(data: Data) -> Row:
    return bench(data, "riad (trained)", DetectorConfig.for_model("riad").with_(contrast=data.base.contrast))


def row_favae(data: Data) -> Row:
    return bench(data, "favae (trained)", DetectorConfig.for_model("favae").with_(contrast=data.base.contrast))


def row_kdad(data: Data) -> Row:
    return bench(data, "kdad (trained, 152 channels)",
                 DetectorConfig.for_model("kdad").with_(contrast=data.base.contrast))


ROWS: list[Callable[[Data], Row]] = [
    row_padim, row_padim_neighbourhood, row_patchcore, row_patchcore_reweighted, row_kmeans, row_lowrank, row_fusion,
    row_riad, row_favae, row_kdad,
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--eval", type=int, default=150, help="OK and NG images each")
    ap.add_argument("--only", nargs="*", help="row function names (e.g. row_padim)")
    ap.add_argument("--kind", choices=("mono", "poly"), default="mono", help="ELPV cell type")
    ap.add_argument("--contrast", choices=("stretch", "flatten"), help="every row with this grey-level rule")
    args = ap.parse_args()
    data = load_data(args.train, args.eval, args.kind, args.contrast)
    print(f"ELPV {args.kind}: fit {len(data.train_paths)} OK, eval {int((data.labels == 0).sum())} OK + "
          f"{int(data.labels.sum())} NG; embedding {data.embed_ms:.1f} ms/image (batch 1), "
          f"torch threads {torch.get_num_threads()}", flush=True)
    header = f"{'model':30s} {'AUROC':>6s} {'fit s':>7s} {'score ms':>9s} {'total ms':>9s} {'file MB':>8s}"
    print(header)
    print("-" * len(header), flush=True)
    for fn in ROWS:
        if args.only and fn.__name__ not in args.only:
            continue
        r = fn(data)
        print(f"{r.model:30s} {r.auroc:6.3f} {r.fit_s:7.1f} {r.score_ms:9.1f} {r.total_ms:9.1f} {r.file_mb:8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
