"""Soak test (issue 6): inspect N images in one process and watch memory, files and threads.

    python benchmarks/bench_soak.py [--images 10000] [--report soak.json]

Fits the default detector on 50 OK ELPV cells, then streams N images (cycling through all
ELPV cells) through core.jobs.inspect_job, the same path the CLI and GUI use. Prints RSS,
open file descriptors and threads at the start, at image 1000 and at the end. Steady RSS
after warm-up, and constant descriptors and threads, mean nothing leaks per image.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def snapshot(proc, done: int, t0: float) -> dict:
    return {"images": done, "seconds": round(time.perf_counter() - t0, 1),
            "rss_mb": round(proc.memory_info().rss / 2**20, 1), "open_fds": proc.num_fds(),
            "threads": proc.num_threads(), "python_threads": threading.active_count()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--report", help="write the measurements here as JSON")
    args = ap.parse_args()

    import psutil

    from core.demo import elpv_cells
    from core.detector import DetectorConfig
    from core.jobs import CancelToken, ScoredImage, fit_job, inspect_job, run_job

    proc = psutil.Process()
    cells = elpv_cells(None)
    ok = [c.path for c in cells if c.is_ok][:50]
    det = run_job(fit_job(ok, DetectorConfig(), CancelToken())).detector
    paths = [c.path for c in itertools.islice(itertools.cycle(cells), args.images)]
    t0 = time.perf_counter()
    marks = {"start": snapshot(proc, 0, t0)}
    print("start", marks["start"], flush=True)
    checkpoint = min(1000, args.images)
    n_scored = n_skipped = 0
    for p in inspect_job(paths, det, CancelToken()):
        if isinstance(p.item, ScoredImage):
            n_scored += 1
        else:
            n_skipped += 1
        if p.done == checkpoint and "at_1000" not in marks:
            marks["at_1000"] = snapshot(proc, p.done, t0)
            print("at_1000", marks["at_1000"], flush=True)
    marks["end"] = snapshot(proc, args.images, t0)
    print("end", marks["end"], flush=True)
    report = {
        "images": args.images, "scored": n_scored, "skipped": n_skipped, **marks,
        "rss_growth_after_1000_mb": round(marks["end"]["rss_mb"] - marks["at_1000"]["rss_mb"], 1),
        "rss_growth_total_mb": round(marks["end"]["rss_mb"] - marks["start"]["rss_mb"], 1),
        "images_per_second": round(args.images / max(marks["end"]["seconds"], 1e-9), 1),
    }
    print(json.dumps({k: report[k] for k in ("scored", "skipped", "rss_growth_after_1000_mb",
                                              "rss_growth_total_mb", "images_per_second")}))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
