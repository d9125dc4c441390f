"""Throttle: run a UI update at most once per interval, the last request never lost.

During live inspection results arrive 30-50 times a second, and redrawing the score histogram
or inserting a table row for each was most of the UI thread's time (profiled with
benchmarks/bench_gui.py: the histogram alone 5.7 ms per result, then its repaint). A
throttled update runs at once when it has not run for ``interval_ms`` (a single result, a
click: no delay), otherwise once at the end of the interval for every request made during it.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QObject, QTimer


class Throttle(QObject):
    def __init__(self, interval_ms: int, update: Callable[[], None], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.interval = interval_ms / 1000.0
        self._update = update
        self._last = float("-inf")
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._run)

    def request(self) -> None:
        """Run the update now if it has not run for the interval, else once when it ends."""
        if self._timer.isActive():
            return
        wait = self._last + self.interval - time.monotonic()
        if wait <= 0:
            self._run()
        else:
            self._timer.start(max(1, int(wait * 1000)))

    def flush(self) -> None:
        """Run a pending update now (nothing if none is pending)."""
        if self._timer.isActive():
            self._timer.stop()
            self._run()

    def _run(self) -> None:
        self._last = time.monotonic()
        self._update()
