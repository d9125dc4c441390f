"""Shared by the tests/core/test_line_*.py modules and benchmarks/bench_line.py: the demo
recipe (ELPV cells, the demo model of the CLI tests), its reference verdicts from
``okng score``, and small waits. Fitted once per test session, on disk."""
from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

from core.recipes import Recipe, save_recipe

N_IMAGES = 24  # the playlist: demo stream cells, good and defective, played in order


def demo_model(folder: Path) -> Path:
    """The demo model (fitted by ``okng fit`` on 20 OK cells), once per folder."""
    from core.demo import demo_split

    model = folder / "cells.okng"
    if not model.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "core.cli", "fit", *demo_split().ok_train[:20], "--out", str(model)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    return model


def playlist() -> list[str]:
    from core.demo import demo_split

    return demo_split().stream_paths[:N_IMAGES]


def make_recipe(folder: Path, name: str, model: Path, image_threshold: float | None = None,
                station: dict | None = None) -> Path:
    from core.persistence import load_detector

    pixel = None
    if image_threshold is not None:
        pixel = load_detector(model, runtime="torch").thresholds.pixel
    return save_recipe(Recipe(name, [], {}, str(model), image_threshold, pixel, dict(station or {})),
                       folder / f"{name}.okrecipe")


def okng_score(recipe: Path, paths: list[str], out: Path) -> dict[str, tuple[str, float]]:
    """path -> (verdict, score) from the real ``okng score`` on the recipe."""
    r = subprocess.run([sys.executable, "-m", "core.cli", "score", "--model", str(recipe), *paths, "--csv", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return {row["path"]: (row["verdict"], float(row["score"])) for row in csv.DictReader(out.open())}


def poll(predicate, timeout: float = 30.0, every: float = 0.002, what: str = "condition"):
    """Call ``predicate`` until it returns a true value (a PLC polls its inputs the same way)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1))))]


class Served:
    """``okng serve ARGS`` as a subprocess, as on a line PC; returns once it says ready."""

    def __init__(self, *args: str, log: Path, timeout: float = 180.0) -> None:
        import os
        import select

        self.args, self.log = args, log
        self.err = log.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "core.cli", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=self.err, env=env)
        deadline = time.monotonic() + timeout
        line = b""
        while b"ready" not in line:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"okng serve did not start: {log.read_text(errors='replace')[-3000:]}")
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
        self.banner = line.decode()

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup (a power cut of the process)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.err.close()

    def stop(self) -> int:
        """SIGTERM: the normal stop."""
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(60)
        self.err.close()
        return rc
