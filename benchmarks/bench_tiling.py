"""Tiling benchmark (issue 15): small defects on high-resolution parts, whole image vs tiles.

Run on purpose (it prints figures; it is not a test; ~15 minutes on this 2-core machine)::

    .venv/bin/python benchmarks/bench_tiling.py [--fit 16] [--test 20] [--json bench-out/tiling.json]

Data: ELPV mono cells (300 x 300, ``elpv-dataset``, the demo's data) upscaled to 2048 x 2048
(bicubic), as a 4 MP line camera would see a cell. Synthetic small defects are pasted into
upscaled *OK* cells at full resolution: a dark spot 4-8 px across or a dark scratch 2-3 px
wide and 12-20 px long, at a random place away from the cell's border, at 35 % of the local
brightness. Each defective image is an OK test cell with one defect, so OK and NG test sets
are the same cells (the only difference is the defect).

Two PaDiM detectors (defaults: Lite0 stages 2, 3, 100 channels), fitted on the same upscaled
OK cells, calibrated on their own held-out share (20 %):

* **224**: the whole 2048 x 2048 image scaled down to 224 (a 6-px defect becomes < 1 px);
* **tiled**: ``tile=224, tile_overlap=28``, 121 tiles per image at the camera's own pixels.

Reported: image AUROC, detection rate at the model's own calibrated threshold (and the false-
alarm rate it gives on the OK test cells), detection rate at zero false alarms on the OK test
cells (the best any threshold does), inspection latency per megapixel (the inspection
runtime ``auto`` picks, one image at a time as a line inspects), and peak RSS of tiled inspection
(``okng score``'s path: no image kept) at 1024 x 1024 and 4096 x 4096, each in a fresh process
with the same model, after loading it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDE = 2048
TILE, OVERLAP = 224, 28


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ok_cells(n: int, seed: int = 0) -> list[str]:
    from core.demo import elpv_cells

    cells = [c.path for c in elpv_cells("mono") if c.is_ok]
    order = np.random.default_rng(seed).permutation(len(cells))
    return [cells[i] for i in order[:n]]


def upscaled(path: str, side: int) -> np.ndarray:
    from core.imageio import load_image

    return cv2.resize(load_image(path), (side, side), interpolation=cv2.INTER_CUBIC)


def paste_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """One small dark defect (spot or scratch) at 35 % of the local brightness; returns the
    image and the defect's centre."""
    h, w = img.shape[:2]
    margin = h // 12
    cy, cx = (int(v) for v in rng.integers(margin, h - margin, 2))
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        cv2.circle(mask, (cx, cy), int(rng.integers(2, 5)), 1, -1)  # 4-8 px across
    else:
        length, angle = rng.integers(12, 21), rng.uniform(0, np.pi)
        dx, dy = int(length / 2 * np.cos(angle)), int(length / 2 * np.sin(angle))
        cv2.line(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 1, int(rng.integers(2, 4)))
    out = img.copy()
    sel = mask.astype(bool)
    out[sel] = (out[sel].astype(np.float32) * 0.35).astype(np.uint8)
    return out, (cy, cx)


def write_png(img: np.ndarray, path: Path) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return str(path)


def make_data(folder: Path, n_fit: int, n_test: int) -> tuple[list[str], list[str], list[str]]:
    cells = ok_cells(n_fit + n_test)
    rng = np.random.default_rng(15)
    fit = [write_png(upscaled(p, SIDE), folder / f"fit_{i:03d}.png") for i, p in enumerate(cells[:n_fit])]
    ok, ng = [], []
    for i, p in enumerate(cells[n_fit:]):
        img = upscaled(p, SIDE)
        ok.append(write_png(img, folder / f"ok_{i:03d}.png"))
        ng.append(write_png(paste_defect(img, rng)[0], folder / f"ng_{i:03d}.png"))
    return fit, ok, ng


def evaluate(name: str, config, fit: list[str], ok: list[str], ng: list[str], folder: Path) -> dict:
    from core.jobs import CancelToken, fit_job, inspect_job, run_job
    from core.metrics import auroc
    from core.persistence import save_detector

    t = time.perf_counter()
    result = run_job(fit_job(fit, config, CancelToken()))
    fit_s = time.perf_counter() - t
    det = result.detector
    model = save_detector(det, folder / f"{name}.okng")
    scores, seconds = {}, []
    for p in inspect_job(ok + ng, det, CancelToken(), batch_size=1):
        scores[p.item.path] = p.item.inspection.score
        seconds.append(p.item.seconds)
    s_ok, s_ng = np.array([scores[p] for p in ok]), np.array([scores[p] for p in ng])
    th = det.thresholds.image if det.thresholds is not None else np.inf
    mp = SIDE * SIDE / 1e6
    return {
        "name": name, "tile": det.config.tile, "overlap": det.config.tile_overlap, "runtime": det.runtime_name,
        "fit_seconds": round(fit_s, 1), "fit_images": len(result.fitted), "held_out": len(result.calibration),
        "auroc": round(auroc(np.r_[np.zeros(len(s_ok)), np.ones(len(s_ng))], np.r_[s_ok, s_ng]), 4),
        "detection_rate": round(float((s_ng > th).mean()), 3),
        "false_alarm_rate": round(float((s_ok > th).mean()), 3),
        # the best any threshold does without one false alarm on the OK test cells
        "detection_at_zero_false_alarms": round(float((s_ng > s_ok.max()).mean()), 3),
        "seconds_per_image": round(float(np.median(seconds)), 3),
        "seconds_per_mp": round(float(np.median(seconds)) / mp, 3),
        "model": str(model),
    }


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024.0
    raise KeyError(field)


def rss_child(model: str, paths: list[str]) -> None:
    """In a fresh process: load the model, inspect one image (runtime and allocator warm),
    then reset the kernel's peak-RSS mark (``/proc/self/clear_refs``) and inspect the rest as
    ``okng score`` does. Prints the process's peak (loading included) and the peak of the
    inspection alone, as JSON."""
    from core.allocator import tune_allocator
    from core.cli import _drive
    from core.jobs import CancelToken, inspect_job
    from core.runtime import load_for_inspection

    tune_allocator()  # as okng's main does
    det = load_for_inspection(model, None)
    _drive(inspect_job(paths[:1], det, CancelToken()), "score")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _status_mb("VmRSS")
    t = time.perf_counter()
    scored = []  # okng score's loop: each result handed on (a CSV row), then let go
    _drive(inspect_job(paths[1:], det, CancelToken()), "score", on_item=lambda i, r: scored.append(r.inspection.score))
    print(json.dumps({"process_peak_mb": peak_rss_mb(), "before_mb": before, "inspection_peak_mb": _status_mb("VmHWM"),
                      "scored": len(scored), "seconds_per_image": (time.perf_counter() - t) / len(scored)}))


def peak_rss(model: str, side: int, folder: Path, n: int = 3) -> dict:
    cells = ok_cells(n, seed=3)
    paths = [write_png(upscaled(p, side), folder / f"rss_{side}_{i}.png") for i, p in enumerate(cells)]
    out = subprocess.run([sys.executable, __file__, "--rss-child", model, *paths], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    d = json.loads(out.stdout.strip().splitlines()[-1])
    d["side"] = side
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", type=int, default=16, help="OK cells to fit on (20 %% of them held out)")
    ap.add_argument("--test", type=int, default=20, help="OK test cells (each also given one defect)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--workdir", help="keep images and models here (default: a temporary folder)")
    ap.add_argument("--rss-only", metavar="MODEL", help="only the peak-RSS part, with this tiled model")
    ap.add_argument("--rss-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1:])
        return
    from core.detector import DetectorConfig

    with tempfile.TemporaryDirectory(prefix="okng-bench-tiling-") as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.rss_only:
            report_rss(args.rss_only, folder)
            return
        fit, ok, ng = make_data(folder, args.fit, args.test)
        rows = [evaluate("whole-224", DetectorConfig(), fit, ok, ng, folder),
                evaluate("tiled", DetectorConfig(tile=TILE, tile_overlap=OVERLAP), fit, ok, ng, folder)]
        print(f"{SIDE}x{SIDE} upscaled ELPV mono cells, {args.fit} OK to fit, {args.test} OK + {args.test} "
              f"with one small defect to test")
        print(f"{'mode':<10} {'AUROC':>6} {'detected':>8} {'false al.':>9} {'det@0FA':>8} {'s/image':>8} "
              f"{'s/MP':>6} {'fit s':>6} runtime")
        for r in rows:
            print(f"{r['name']:<10} {r['auroc']:>6.3f} {r['detection_rate']:>8.1%} {r['false_alarm_rate']:>9.1%} "
                  f"{r['detection_at_zero_false_alarms']:>8.1%} {r['seconds_per_image']:>8.2f} "
                  f"{r['seconds_per_mp']:>6.2f} {r['fit_seconds']:>6.0f} {r['runtime']}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"modes": rows}, indent=2))
        rss = report_rss(rows[1]["model"], folder)
        if args.json:
            Path(args.json).write_text(json.dumps({"modes": rows, "rss": rss}, indent=2))


def report_rss(tiled_model: str, folder: Path) -> list[dict]:
    rss = [peak_rss(tiled_model, side, folder) for side in (1024, 4096)]
    for r in rss:
        print(f"tiled inspection at {r['side']}x{r['side']}: process peak RSS {r['process_peak_mb']:.0f} MB; "
              f"inspection alone: {r['before_mb']:.0f} MB before, peak {r['inspection_peak_mb']:.0f} MB "
              f"({r['seconds_per_image']:.1f} s/image)")
    print(f"peak RSS 4096 - 1024: process {rss[1]['process_peak_mb'] - rss[0]['process_peak_mb']:+.0f} MB, "
          f"inspection {rss[1]['inspection_peak_mb'] - rss[0]['inspection_peak_mb']:+.0f} MB "
          "(target: within 100 MB)")
    return rss


if __name__ == "__main__":
    main()
