"""Smoke test of the built station (packaging/build_installer.sh's dist/okng/), not part of CI.

    python packaging/smoke_test.py [--dist dist/okng] [--out build/smoke] [--starts 3]

1. **The window**: starts ``okng demo`` of the build on a private Xvfb display, as an operator
   would; the station writes ``OKNG_READY_FILE`` once its window is shown (gui/app.py). Checks
   the window is visible with the demo recipe and its 200 OK cells, takes a screenshot of the
   display (ImageMagick's ``import``) and checks it is not blank. Start-up = launch to window
   shown, wall clock, once per ``--starts``.
2. **Same verdicts**: fits a model with the build's ``okng fit`` on OK cells of the demo data
   inside the bundle, scores other cells with the build's ``okng score`` and with the
   development install (``--dev-python``, run from this work tree) and compares: verdicts equal,
   scores within 1e-3 relative.

Needs Xvfb and ImageMagick (``apt-get install -y xvfb imagemagick`` plus Qt's xcb libraries:
see the README's Installer section). Prints a JSON summary; exit status 0 when every check passed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_TITLE = "OK/NG Station — ELPV mono cells (demo)"


def start_xvfb(display: str) -> subprocess.Popen:
    if shutil.which("Xvfb") is None:
        raise SystemExit("smoke test: Xvfb is not installed (apt-get install -y xvfb)")
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket = Path("/tmp/.X11-unix") / f"X{display.lstrip(':')}"
    for _ in range(100):
        if socket.exists():
            return xvfb
        time.sleep(0.05)
    xvfb.kill()
    raise SystemExit(f"smoke test: Xvfb did not start on {display}")


def start_demo(exe: Path, display: str, out: Path, index: int, timeout: float) -> dict:
    """Launch ``okng demo``, wait for the ready file; return its content with the start-up time."""
    ready = out / f"ready-{index}.json"
    ready.unlink(missing_ok=True)
    home = out / "home"  # fresh settings, as on a new line PC
    env = dict(os.environ, DISPLAY=display, QT_QPA_PLATFORM="xcb", OKNG_READY_FILE=str(ready),
               XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"),
               XDG_CACHE_HOME=str(home / "cache"))
    log = open(out / f"demo-{index}.log", "w")
    t0 = time.time()
    proc = subprocess.Popen([str(exe), "demo"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"smoke test: okng demo exited with {proc.returncode} (see {log.name})")
            if time.time() - t0 > timeout:
                raise SystemExit(f"smoke test: no window after {timeout:.0f} s (see {log.name})")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        info["startup_s"] = round(info["time"] - t0, 2)
        if index == 0:
            time.sleep(2.0)  # let the panels settle before the screenshot
            shot = out / "screenshot.png"
            subprocess.run(["import", "-display", display, "-window", "root", str(shot)], check=True)
            colours = subprocess.run(["identify", "-format", "%k", str(shot)], capture_output=True,
                                     text=True, check=True).stdout.strip()
            info["screenshot"], info["screenshot_colours"] = str(shot), int(colours)
        return info
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def demo_cells(dist: Path) -> tuple[list[Path], list[Path]]:
    """(OK cells to fit, mixed cells to score) from the ELPV data inside the bundle."""
    data = dist / "_internal" / "elpv_dataset" / "data"
    rows = [line.split() for line in (data / "labels.csv").read_text().splitlines() if line.strip()]
    mono = [(data / r[0], float(r[1])) for r in rows if len(r) == 3 and r[2] == "mono"]
    ok = [p for p, prob in mono if prob == 0.0]
    ng = [p for p, prob in mono if prob == 1.0]
    return ok[:60], ok[60:72] + ng[:12]


def read_csv(path: Path) -> dict[str, tuple[str, float]]:
    with open(path, newline="") as f:
        return {Path(r["path"]).name: (r["verdict"], float(r["score"])) for r in csv.DictReader(f)}


def same_verdicts(exe: Path, dev_python: str, dist: Path, out: Path) -> dict:
    ok, mixed = demo_cells(dist)
    work = out / "verdicts"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ok").mkdir(parents=True)
    (work / "mixed").mkdir()
    for p in ok:
        (work / "ok" / p.name).symlink_to(p)
    for p in mixed:
        (work / "mixed" / p.name).symlink_to(p)
    model = work / "cells.okng"
    env = dict(os.environ, OKNG_CACHE_DIR=str(work / "cache"))
    subprocess.run([str(exe), "fit", str(work / "ok"), "--out", str(model)], env=env, check=True,
                   capture_output=True)
    t0 = time.time()
    subprocess.run([str(exe), "score", "--model", str(model), str(work / "mixed"), "--csv",
                    str(work / "built.csv")], env=env, check=True, capture_output=True)
    built_s = time.time() - t0
    dev_env = dict(env, PYTHONPATH=str(ROOT))
    subprocess.run([dev_python, "-m", "core.cli", "score", "--model", str(model), str(work / "mixed"), "--csv",
                    str(work / "dev.csv")], env=dev_env, check=True, capture_output=True, cwd=ROOT)
    built, dev = read_csv(work / "built.csv"), read_csv(work / "dev.csv")
    differing = sorted(k for k in dev if k not in built or built[k][0] != dev[k][0])
    worst = max(abs(built[k][1] - dev[k][1]) / max(abs(dev[k][1]), 1e-9) for k in dev if k in built)
    return {"images": len(dev), "ng": sum(v[0] == "NG" for v in dev.values()), "differing_verdicts": differing,
            "max_relative_score_difference": worst, "built_score_s": round(built_s, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dist", default=str(ROOT / "dist" / "okng"), help="the built folder")
    ap.add_argument("--out", default=str(ROOT / "build" / "smoke"), help="logs, screenshot, CSVs")
    ap.add_argument("--starts", type=int, default=3, help="how many times to start the window")
    ap.add_argument("--display", default=":99")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the window")
    ap.add_argument("--dev-python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="the development install's Python, to compare verdicts with")
    args = ap.parse_args(argv)
    dist, out = Path(args.dist).resolve(), Path(args.out).resolve()
    exe = dist / "okng"
    if not exe.is_file():
        raise SystemExit(f"smoke test: {exe} not found; build it with packaging/build_installer.sh")
    out.mkdir(parents=True, exist_ok=True)
    xvfb = start_xvfb(args.display)
    try:
        starts = [start_demo(exe, args.display, out, i, args.timeout) for i in range(args.starts)]
    finally:
        xvfb.terminate()
        xvfb.wait()
    first = starts[0]
    verdicts = same_verdicts(exe, args.dev_python, dist, out)
    checks = {
        "window_visible": all(s["visible"] for s in starts),
        "demo_loaded": all(s["title"] == DEMO_TITLE and s["ok_images"] == 200 for s in starts),
        "frozen_program": all(s["frozen"] for s in starts),
        "screenshot_not_blank": first["screenshot_colours"] > 100,
        "same_verdicts": not verdicts["differing_verdicts"],
        "scores_agree": verdicts["max_relative_score_difference"] < 1e-3,
    }
    summary = {
        "checks": checks, "startup_s": [s["startup_s"] for s in starts],
        "startup_median_s": statistics.median(s["startup_s"] for s in starts),
        "window": {k: first[k] for k in ("title", "width", "height")}, "screenshot": first["screenshot"],
        "screenshot_colours": first["screenshot_colours"], "verdicts": verdicts,
    }
    print(json.dumps(summary, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
