"""GUI responsiveness benchmark (issue 3). A script, not a test: it prints figures.

Opens the real MainWindow offscreen with the real EngineRunner and measures the longest stall
of the UI event loop (a 5 ms QTimer records the gap between its ticks) while

(a) a fit runs on 60 demo OK cells (``core.demo.demo_split().ok_train[:60]``), then
(b) live inspection runs over an MJPG video of ~100 ELPV cells (300x300 frames).

For (b) it counts results delivered by the engine (``controller.result_added``) against frames
actually rendered by the inspection view (``InspectionView.set_image`` wrapped), and checks that
every scored frame was either shown or superseded by a newer one that was shown afterwards.

    QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/bench_gui.py [--frames 100] [--fit 60]

Target: no stall over 100 ms; 0 results dropped without a newer frame shown.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gui  # noqa: E402,F401  (PySide6 workaround first)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PySide6.QtCore import QElapsedTimer, QEventLoop, QSettings, Qt, QTimer  # noqa: E402


class StallMeter:
    """Gaps between ticks of a 5 ms timer in the GUI thread, i.e. how long the UI was blocked."""

    def __init__(self, interval_ms: int = 5) -> None:
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.clock = QElapsedTimer()
        self.gaps: list[float] = []
        self._last: int | None = None

    def start(self) -> None:
        self.gaps, self._last = [], None
        self.clock.start()
        self.timer.start()

    def stop(self) -> np.ndarray:
        self.timer.stop()
        return np.asarray(self.gaps, np.float64)

    def _tick(self) -> None:
        now = self.clock.nsecsElapsed()
        if self._last is not None:
            self.gaps.append((now - self._last) / 1e6)
        self._last = now


def wait_for(signal, timeout_s: float) -> bool:
    """Run the event loop until ``signal`` fires with a falsy first argument (busy/live -> False)."""
    loop = QEventLoop()
    done = {"ok": False}

    def on(value=None):
        if not value:
            done["ok"] = True
            loop.quit()

    signal.connect(on)
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    loop.exec()
    signal.disconnect(on)
    return done["ok"]


def settle(ms: int = 300) -> None:
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def write_video(paths: list[str], out: Path, size: int) -> int:
    from core import load_image

    w = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 25, (size, size))
    n = 0
    for p in paths:
        rgb = load_image(p)
        if rgb.shape[:2] != (size, size):
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        w.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        n += 1
    w.release()
    return n


def summary(name: str, gaps: np.ndarray, seconds: float) -> None:
    if gaps.size == 0:
        print(f"{name}: no timer ticks recorded")
        return
    print(f"{name}: {seconds:.1f} s, {gaps.size} ticks, max stall {gaps.max():.1f} ms, "
          f"p99 stall {np.percentile(gaps, 99):.1f} ms, median tick gap {np.median(gaps):.1f} ms, "
          f"ticks > 100 ms: {int((gaps > 100).sum())}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=60, help="OK cells to fit on")
    ap.add_argument("--frames", type=int, default=100, help="cells in the live video")
    ap.add_argument("--size", type=int, default=300, help="video frame size (px)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per phase, seconds")
    args = ap.parse_args(argv)

    from core import DetectorConfig
    from core.demo import demo_split
    from gui.app import build

    tmp = Path(tempfile.mkdtemp(prefix="okng-bench-gui-"))
    settings = QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat)
    app, c, window = build(settings)
    window.show()
    settle(500)
    meter = StallMeter()
    split = demo_split()
    ok = split.ok_train[: args.fit]
    pool = split.stream_paths + split.ok_train[args.fit:]
    cells = [pool[i % len(pool)] for i in range(args.frames)]  # cycles for long (soak) runs
    video = tmp / "cells.avi"
    n_video = write_video(cells, video, args.size)
    errors: list[str] = []
    c.error.connect(errors.append)

    # (a) fit
    c.session.new_recipe("bench", DetectorConfig(), ok)
    settle(500)  # let the OK thumbnails load: that is not what is measured here
    meter.start()
    t0 = time.perf_counter()
    c.session.start_fit()
    fitted = wait_for(c.busy_changed, args.timeout) and c.session.detector is not None
    fit_s = time.perf_counter() - t0
    fit_gaps = meter.stop()
    print(f"fit on {len(ok)} OK cells: {'done' if fitted else 'FAILED/TIMEOUT'} in {fit_s:.1f} s")
    summary("  UI during fit", fit_gaps, fit_s)
    if not fitted:
        print("errors:", errors)
        return 1

    # (b) live over the video
    arrived: list[str] = []  # result names in the order the engine delivered them
    rendered: list[tuple[str, int]] = []  # (name, number of results arrived when it was rendered)
    c.result_added.connect(lambda rec: arrived.append(rec.name))
    # Soak figures (issue 6): memory, open files and threads at result 1,000 and at the end.
    import psutil

    proc = psutil.Process()
    marks: dict[str, tuple[float, int, int]] = {}

    def mark(name: str) -> None:
        marks[name] = (proc.memory_info().rss / 2**20, proc.num_fds(), proc.num_threads())

    c.result_added.connect(lambda rec: len(arrived) == 1000 and "at_1000" not in marks and mark("at_1000"))
    mark("start")
    view = window.view
    real_set_image = view.set_image

    def counting_set_image(rgb, name="", **kwargs):
        rendered.append((name, len(arrived)))
        return real_set_image(rgb, name, **kwargs)

    view.set_image = counting_set_image
    settle(300)
    meter.start()
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter()
    c.session.start_live("video", str(video))
    stopped = wait_for(c.live_changed, args.timeout)
    live_s = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    settle(200)  # the last render is queued behind the job's end
    live_gaps = meter.stop()
    print(f"live over {n_video} frames ({args.size}x{args.size} MJPG): "
          f"{'done' if stopped else 'TIMEOUT'} in {live_s:.1f} s")
    summary("  UI during live", live_gaps, live_s)

    index = {name: i for i, name in enumerate(arrived)}
    shown = [index[n] for n, _ in rendered if n in index]
    last_shown = max(shown) if shown else -1
    dropped = len(arrived) - 1 - last_shown  # results never shown and with no newer frame shown after
    stale = sum(1 for n, seen in rendered if n in index and index[n] != seen - 1)  # not the newest
    engine_fps = len(arrived) / live_s if live_s else 0.0
    render_fps = len(rendered) / live_s if live_s else 0.0
    superseded = len(arrived) - len(set(shown))

    all_gaps = np.concatenate([fit_gaps, live_gaps])
    print()
    print(f"max stall ms:            {all_gaps.max():.1f}  (fit {fit_gaps.max():.1f}, live {live_gaps.max():.1f})")
    print(f"p99 stall ms:            {np.percentile(all_gaps, 99):.1f}  "
          f"(fit {np.percentile(fit_gaps, 99):.1f}, live {np.percentile(live_gaps, 99):.1f})")
    print(f"engine results/s:        {engine_fps:.2f}  ({len(arrived)} results)")
    print(f"rendered frames/s:       {render_fps:.2f}  ({len(rendered)} renders; {superseded} results "
          f"superseded by a newer one before being drawn; {stale} renders of a non-newest result)")
    print(f"dropped without supersede: {dropped}")
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(f"CPU per result (all threads): {1000 * cpu_s / max(len(arrived), 1):.1f} ms "
          f"(a measure other work on the machine moves less than frames/s); load average {os.getloadavg()[0]:.1f}")
    mark("end")
    for name, (rss, fds, threads) in marks.items():
        print(f"soak {name:8s}: RSS {rss:7.1f} MB, open files {fds}, threads {threads}")
    if "at_1000" in marks:
        print(f"soak RSS growth from result 1,000 to {len(arrived):,}: {marks['end'][0] - marks['at_1000'][0]:+.1f} MB "
              "(target < 50 MB)")
    verdict = all_gaps.max() <= 100.0 and dropped == 0 and not errors
    print(f"target (no stall > 100 ms, 0 dropped): {'MET' if verdict else 'NOT MET'}")
    if errors:
        print("errors:", errors)
    c.session.mark_saved()  # the benchmark's recipe is a scratch one: no "Save changes?" dialog
    window.close()  # as an operator quits: the line link, the engine thread and the stores end
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the window is closed; no need to tear the rest of Qt down
