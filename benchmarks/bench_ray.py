"""Archive scoring on Ray against a local run (issue 17): images/s and the cost of a task.

Run on purpose (it prints figures; it is not a test)::

    .venv/bin/pip install 'okng-station[ray]'
    .venv/bin/python benchmarks/bench_ray.py [--images 256] [--json bench-out/ray.json]

Data: ELPV solar cells (``elpv-dataset``, 300x300 PNG). A PaDiM model (the defaults:
EfficientNet-Lite0, 224 px, 100 channels) is fitted on 40 OK cells, then the same
``--images`` cells are scored:

* locally, as ``okng score`` does (one process, PyTorch's threads: all cores), and with one
  thread (what one Ray task gets);
* on a private Ray with 1 and with 2 single-thread workers (``okng score --ray``, ``--chunk``
  images per task, 32 by default so that 256 images make 8 tasks). Each Ray setup runs
  ``--repeats`` + 1 times: the first run (``cold``) includes the workers' start and their one
  model load; the others (``warm``) are the steady state an archive of millions of images sees.

Overhead per task: the round trip of an empty Ray task (submit, schedule, run, return), the
driver's cost per row (a worker's record to a CSV line) and the size of a 64-image task's
records, and the warm 1-worker run minus the 1-thread local run, divided by its number of
tasks (only meaningful on a quiet machine: it is a small difference of two large times).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every process it started (a private
    Ray's workers, raylet, GCS): what the work really cost, whatever else the machine runs."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``run()``; a process that exits during the run is not
    counted (none does in a warm run)."""
    c, t = cpu_seconds(), time.perf_counter()
    run()
    return time.perf_counter() - t, cpu_seconds() - c


def cells(n: int, skip: int = 0) -> list[str]:
    from core.demo import elpv_cells

    return [c.path for c in elpv_cells(None)][skip : skip + n]


def fit_model(folder: Path) -> Path:
    from core.cli import main
    from core.demo import elpv_cells

    out = folder / "bench.okng"
    ok = [c.path for c in elpv_cells("mono") if c.is_ok][:40]
    assert main(["fit", *ok, "--out", str(out)]) == 0
    return out


def run_local(model: Path, paths: list[str], threads: int | None, repeats: int) -> list[tuple[float, float]]:
    import torch

    from core.jobs import CancelToken, inspect_job
    from core.runtime import load_for_inspection

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        det = load_for_inspection(model)
        det.warm_up()
        list(inspect_job(paths[:8], det, CancelToken()))  # first-call costs out of the figure
        return [timed(lambda: list(inspect_job(paths, det, CancelToken()))) for _ in range(repeats)]
    finally:
        torch.set_num_threads(before)


def run_ray(model: Path, paths: list[str], workers: int, chunk: int, repeats: int) -> dict:
    import ray

    from core.jobs import CancelToken
    from core.ray_cluster import RayOptions, connected
    from core.ray_score import chunk_size, ray_inspect_job
    from core.runtime import load_for_inspection

    det = load_for_inspection(model)
    data = model.read_bytes()
    opts = RayOptions(num_cpus=workers, chunk=chunk)
    out = {"workers": workers, "tasks": -(-len(paths) // chunk_size(opts, det.config.batch_size))}
    t = time.perf_counter()
    with connected(opts):
        out["start_s"] = time.perf_counter() - t
        def run():
            for _ in ray_inspect_job(paths, data, det.runtime_name, det.config.batch_size, opts, CancelToken()):
                pass

        times = [timed(run) for _ in range(1 + repeats)]  # the first: cold
        out["cold"], out["warm"] = times[0], times[1:]

        @ray.remote(num_cpus=1)
        def nothing(x):
            return x

        ray.get([nothing.remote(i) for i in range(20)])  # workers up
        n = 200
        t = time.perf_counter()
        for i in range(n):  # one at a time: the latency of a round trip, not the pipelined rate
            ray.get(nothing.remote(i))
        out["empty_task_ms"] = (time.perf_counter() - t) / n * 1000
    return out


def driver_cost(n: int = 100_000) -> tuple[float, int]:
    """(microseconds per row on the driver, bytes of 64 pickled records)."""
    import csv
    import io
    import pickle

    from core.cli import result_row
    from core.ray_score import ScoredRow

    rows = [ScoredRow(f"/archive/2026/line3/cam2/part_{i:08d}.png", 12.3456789 + i, "OK", 15.5) for i in range(n)]
    w = csv.DictWriter(io.StringIO(), fieldnames=["path", "score", "verdict", "peak", "error"])
    t = time.perf_counter()
    for r in rows:
        w.writerow(result_row(r))
    return (time.perf_counter() - t) / n * 1e6, len(pickle.dumps(rows[:64]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32, help="images per Ray task")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setup (best and median shown)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from core.runtime import load_for_inspection

    with tempfile.TemporaryDirectory(prefix="okng-bench-ray-") as tmp:
        model = fit_model(Path(tmp))
        runtime = load_for_inspection(model).runtime_name
        paths = cells(args.images, skip=1000)
        n = len(paths)
        local_all = run_local(model, paths, None, args.repeats)
        local_one = run_local(model, paths, 1, args.repeats)
        rays = [run_ray(model, paths, w, args.chunk, args.repeats) for w in (1, 2)]
    per_task_ms = (min(w for w, _ in rays[0]["warm"]) - min(w for w, _ in local_one)) / rays[0]["tasks"] * 1000
    rows = [("local (okng score), all threads", local_all), ("local, 1 thread", local_one)]
    for r in rays:
        rows.append((f"Ray, {r['workers']} worker(s) x 1 thread, warm", r["warm"]))
        rows.append((f"Ray, {r['workers']} worker(s) x 1 thread, cold (incl. model load)", [r["cold"]]))
    print(f"{n} ELPV cells, PaDiM defaults (224 px, 100 channels), runtime {runtime}, {args.chunk} images "
          f"per Ray task; best (median) of {args.repeats} runs; CPU: this process and all it started")
    print(f"| {'setup':<55} | {'images/s':>15} | {'ms/image':>15} | {'CPU ms/image':>12} |")
    print(f"|{'-' * 57}|{'-' * 16}:|{'-' * 16}:|{'-' * 13}:|")
    for name, runs in rows:
        walls = [w for w, _ in runs]
        best, med = min(walls), statistics.median(walls)
        cpu = statistics.median(c for _, c in runs) / n * 1000
        print(f"| {name:<55} | {n / best:>6.1f} ({n / med:>6.1f}) | {best / n * 1000:>6.1f} ({med / n * 1000:>6.1f}) "
              f"| {cpu:>12.1f} |")
    print(f"Ray start (private, 1 / 2 CPUs): {rays[0]['start_s']:.1f} / {rays[1]['start_s']:.1f} s")
    print(f"empty task round trip: {rays[0]['empty_task_ms']:.2f} ms (1 worker), {rays[1]['empty_task_ms']:.2f} ms "
          f"(2 workers)")
    row_us, chunk_bytes = driver_cost()
    print(f"driver: {row_us:.0f} us per row; 64 records pickled: {chunk_bytes} bytes")
    print(f"overhead per scoring task (best Ray 1 worker warm - best local 1 thread, per task): {per_task_ms:.0f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": n, "runtime": runtime, "local_all": local_all,
                                         "local_one": local_one, "ray": rays, "per_task_ms": per_task_ms,
                                         "driver_row_us": row_us, "records_64_bytes": chunk_bytes},
                                        indent=2))


if __name__ == "__main__":
    main()
