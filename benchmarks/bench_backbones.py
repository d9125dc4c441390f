"""The offline backbones side by side: accuracy and cost of PaDiM on each (run on purpose).

    nice .venv/bin/python benchmarks/bench_backbones.py [--train 200] [--eval 150] [--kinds mono poly]

For each offline EfficientNet-Lite (Lite0 default, Lite1, Lite2; README "Configuration"), the
default recipe (PaDiM, stages 2+3, 224 px, default channel subset) is fitted on
``demo_split(kind).ok_train`` and evaluated on ``eval_ok[:N]`` + ``eval_ng[:N]`` of the same
cell type. Prints image AUROC per cell type, the fit time, and the inspection latency per image
at batch 1 on PyTorch (median of 30, after 3 warm-up images).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.demo import demo_split  # noqa: E402
from core.detector import DetectorConfig  # noqa: E402
from core.imageio import load_image  # noqa: E402
from core.jobs import CancelToken, fit_job, run_job  # noqa: E402
from core.metrics import auroc  # noqa: E402

BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def evaluate(backbone: str, kind: str, n_train: int, n_eval: int) -> tuple[float, float, float]:
    split = demo_split(n_train=n_train, kind=kind)
    cfg = DetectorConfig.for_model("padim", backbone=backbone)
    t0 = time.perf_counter()
    det = run_job(fit_job(split.ok_train, cfg, CancelToken())).detector
    fit_s = time.perf_counter() - t0
    det.use_runtime("torch")
    paths = split.eval_ok[:n_eval] + split.eval_ng[:n_eval]
    labels = np.r_[np.zeros(len(split.eval_ok[:n_eval])), np.ones(len(split.eval_ng[:n_eval]))]
    scores = []
    for i in range(0, len(paths), 16):
        scores += [r.score for r in det.inspect([load_image(p) for p in paths[i:i + 16]])]
    one = [load_image(p) for p in paths[:33]]
    times = []
    for k, img in enumerate(one):
        t = time.perf_counter()
        det.inspect([img])
        if k >= 3:
            times.append((time.perf_counter() - t) * 1000)
    return auroc(labels, np.asarray(scores)), fit_s, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--eval", type=int, default=150, help="OK and NG cells each")
    ap.add_argument("--kinds", nargs="+", default=["mono", "poly"])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    args = ap.parse_args()
    print(f"{'backbone':24} {'cells':6} {'AUROC':>6} {'fit s':>6} {'ms/image':>8}")
    for backbone in args.backbones:
        for kind in args.kinds:
            a, fit_s, ms = evaluate(backbone, kind, args.train, args.eval)
            print(f"{backbone:24} {kind:6} {a:6.3f} {fit_s:6.1f} {ms:8.1f}", flush=True)


if __name__ == "__main__":
    main()
