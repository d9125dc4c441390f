"""Runtime benchmark (issue 14): torch, ONNX Runtime and OpenVINO side by side.

Run on purpose, on a quiet machine (it prints figures; it is not a test)::

    .venv/bin/python benchmarks/bench_runtime.py [--images 300] [--json bench-out/runtime.json]

1. **Latency per image at batch 1** (decode excluded): the same preprocessed ELPV cells, a
   PaDiM model fitted on 50 OK cells (Lite0 stages 2+3, 224 px, 100 channels), ``embed`` then
   ``inspect_embeddings``; calls interleaved runtime by runtime, image by image, so drift in
   this machine's speed hits all alike; median over ``--rounds`` x 40 images. The embedding
   alone (what the runtime runs) is timed the same way.
2. **``okng score`` over a folder** of ``--images`` cells (default 300), a fresh process per
   runtime (``--runtime``), wall time, beside a bare PyTorch process that only decodes,
   resizes and runs the same pruned backbone (batch 16) over the folder: the reference.

Targets: batch-1 latency <= 8 ms median; ``okng score`` <= 0.6x the bare process. The load
average is printed with every figure: other work on this 2-core machine moves them by ±30 %.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def load_average() -> float:
    return os.getloadavg()[0]


def ok_pool(n: int) -> list[str]:
    import numpy as np

    from core.demo import elpv_cells

    cells = [c for c in elpv_cells(None) if c.is_ok]
    order = np.random.default_rng(1).permutation(len(cells))
    return [cells[i].path for i in order[:n]]


def worker_bare(folder: str) -> dict:
    """Only decode, resize and run the (same, pruned) backbone over a folder (batch 16)."""
    import torch

    from core.allocator import tune_allocator
    from core.backbone import BackboneSpec, FeatureExtractor
    from core.imageio import iter_image_paths
    from core.jobs import iter_batches

    tune_allocator()
    ex = FeatureExtractor(BackboneSpec())
    n = 0
    with torch.inference_mode():
        for b in iter_batches([str(p) for p in iter_image_paths([folder])], 224, 16):
            ex(b.tensor)
            n += len(b.paths)
    return {"images": n}


def _total(det):
    return lambda x: det.inspect_embeddings(det.embed(x))


def latency(model: Path, rounds: int) -> dict:
    import torch

    from core.demo import demo_split
    from core.detector import preprocess
    from core.imageio import load_image
    from core.persistence import load_detector
    from core.runtime import installed_runtimes

    split = demo_split()
    singles = [preprocess([load_image(p)], 224) for p in split.eval_ok[:40]]
    base = load_detector(model)
    dets = {}
    for name in installed_runtimes():
        d = load_detector(model, base.extractor)
        got = d.use_runtime(name)
        if got == name:
            dets[name] = d
        else:
            print(f"{name}: not available ({'; '.join(d.runtime_notes)})", flush=True)
    fns = {}
    for name, det in dets.items():
        det.warm_up()
        fns[f"{name}/embed"] = det.embed
        fns[f"{name}/total"] = _total(det)
    for fn in fns.values():
        fn(singles[0])
        fn(singles[1])
    times: dict[str, list[float]] = {k: [] for k in fns}
    la0 = load_average()
    with torch.inference_mode():
        for _ in range(rounds):
            for x in singles:
                for k, fn in fns.items():
                    t = time.perf_counter()
                    fn(x)
                    times[k].append(time.perf_counter() - t)
    out = {k: {"median_ms": 1000 * statistics.median(v), "best_ms": 1000 * min(v)} for k, v in times.items()}
    out["threads"] = {name: getattr(getattr(d, "_runtime", None), "threads", torch.get_num_threads())
                      for name, d in dets.items()}
    out["load_average"] = [la0, load_average()]
    return out


#: CPU seconds (user + system) of every process timed, by command kind: on a shared machine
#: wall time swings with other work, CPU time much less (threads waiting for a core do not
#: count), so it is printed beside the wall figures
CPU_SECONDS: dict[str, list[float]] = {}


def timed(cmd: list[str], kind: str = "") -> tuple[float, str, float]:
    """(wall seconds, stderr, peak RSS in MB) of one fresh process. The peak comes from GNU
    time when it is there (a child forked from this big process would inherit its high-water
    mark), else it is reported as 0. Its CPU time goes to ``CPU_SECONDS[kind]``."""
    import resource

    gnu_time = Path("/usr/bin/time")
    full = [str(gnu_time), "-f", "OKNG_BENCH_MAXRSS_KB %M", *cmd] if gnu_time.exists() else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(full, capture_output=True, text=True, env=ENV, cwd=str(ROOT))
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{r.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    CPU_SECONDS.setdefault(kind, []).append(cpu)
    kb = [int(line.split()[-1]) for line in r.stderr.splitlines() if line.startswith("OKNG_BENCH_MAXRSS_KB")]
    return seconds, r.stderr, (kb[-1] / 1024.0 if kb else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300, help="cells in the okng score folder")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the 40 latency images")
    ap.add_argument("--repeats", type=int, default=2, help="okng score / bare runs per runtime (median)")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args()
    from core.runtime import installed_runtimes

    res: dict = {"nproc": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        os.environ["OKNG_CACHE_DIR"] = ENV["OKNG_CACHE_DIR"] = str(d / "cache")
        model = d / "m.okng"
        subprocess.run([PY, "-m", "core.cli", "fit", *ok_pool(args.images + 50)[args.images:], "--out", str(model)],
                       check=True, capture_output=True, env=ENV, cwd=str(ROOT))
        print(f"model fitted on 50 OK cells; graph cached: {sorted(p.name for p in d.glob('m.okng.embed-*'))}")

        folder, one = d / "imgs", d / "one"
        folder.mkdir()
        one.mkdir()
        for p in ok_pool(args.images):
            (folder / Path(p).name).symlink_to(p)
        (one / Path(ok_pool(1)[0]).name).symlink_to(ok_pool(1)[0])
        keys = ["bare", *installed_runtimes()]

        def run(key: str, where: Path) -> tuple[float, float]:
            kind = f"{key}/{'one' if where == one else 'all'}"
            if key == "bare":
                s, _, mb = timed([PY, str(Path(__file__).resolve()), "worker", "bare", str(where)], kind)
            else:
                s, err, mb = timed([PY, "-m", "core.cli", "score", "--model", str(model), str(where),
                                    "--runtime", key, "--csv", str(d / f"{key}.csv")], kind)
                if f"(runtime {key})" not in err:
                    print(f"  {key}: did not run on {key}: {err.strip().splitlines()[-3:]}")
            return s, mb

        runs: dict[str, list[float]] = {k: [] for k in keys}
        loads: dict[str, list[float]] = {k: [] for k in keys}
        rss: dict[str, list[float]] = {k: [] for k in keys}
        starts: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(args.repeats):
            for key in keys:
                loads[key].append(load_average())
                starts[key].append(run(key, one)[0])  # the fixed cost: the same process on one image
                s, mb = run(key, folder)
                runs[key].append(s)
                rss[key].append(mb)
        bare = statistics.median(runs["bare"])
        start = {k: statistics.median(v) for k, v in starts.items()}
        n = args.images
        res["score"] = {k: {"seconds": statistics.median(v), "runs": v, "load_average": loads[k],
                            "peak_rss_mb": max(rss[k]), "ratio_to_bare": statistics.median(v) / bare,
                            "one_image_s": start[k],
                            "per_image_ms": 1000 * (statistics.median(v) - start[k]) / (n - 1)}
                        for k, v in runs.items()}
        print(f"\nokng score over {n} cells, wall s (median of {args.repeats}; load average at start); "
              f"start-up = the same process on 1 image; per image = the rest / {n - 1}")
        cpu_bare = statistics.median(CPU_SECONDS["bare/all"])
        for k, r in res["score"].items():
            r["cpu_s"] = statistics.median(CPU_SECONDS[f"{k}/all"])
            r["cpu_one_image_s"] = statistics.median(CPU_SECONDS[f"{k}/one"])
            r["cpu_ratio_to_bare"] = r["cpu_s"] / cpu_bare
            print(f"  {k:12s} {r['seconds']:6.1f} s  ({r['ratio_to_bare']:.2f}x bare)  "
                  f"start-up {r['one_image_s']:4.1f} s  per image {r['per_image_ms']:5.1f} ms  "
                  f"peak RSS {r['peak_rss_mb']:5.0f} MB  runs "
                  f"{[round(x, 1) for x in r['runs']]}  load {[round(x, 2) for x in r['load_average']]}")
            print(f"  {'':12s} CPU {r['cpu_s']:6.1f} s ({r['cpu_ratio_to_bare']:.2f}x bare), "
                  f"start-up {r['cpu_one_image_s']:4.1f} s")

        res["latency"] = lat = latency(model, args.rounds)
        print(f"\nbatch-1 latency per image, median (best) ms; load average {lat['load_average'][0]:.2f} -> "
              f"{lat['load_average'][1]:.2f}; threads {lat['threads']}")
        for name in installed_runtimes():
            if f"{name}/total" in lat:
                e, t = lat[f"{name}/embed"], lat[f"{name}/total"]
                print(f"  {name:12s} embedding {e['median_ms']:6.1f} ({e['best_ms']:5.1f})   "
                      f"total {t['median_ms']:6.1f} ({t['best_ms']:5.1f})", flush=True)

    best = min((lat[f"{n}/total"]["median_ms"], n) for n in installed_runtimes() if f"{n}/total" in lat)
    print(f"\nsummary: fastest batch-1 latency {best[0]:.1f} ms ({best[1]}; target <= 8 ms)")
    fastest = min((r["ratio_to_bare"], k) for k, r in res["score"].items() if k != "bare")
    print(f"summary: okng score / bare PyTorch = {fastest[0]:.2f} ({fastest[1]}; target <= 0.6)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        print(json.dumps(worker_bare(sys.argv[3])))
    else:
        main()
