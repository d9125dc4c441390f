"""StationController: the Qt face of a Qt-free :class:`core.session.InspectionSession`.

It owns nothing of the station's state. Widgets send their intents straight to
``controller.session`` (and ``session.labels``); the session's notifications come back here
and leave as Qt signals, and a burst of results during one paint collapses into one render of
the newest (``display_changed``). Questions the session leaves to a person
(:class:`core.events.Question`) go out as ``question_asked`` for the window to show.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from PySide6.QtCore import QObject, QStandardPaths, QTimer, Signal, Slot

from core.jobs import Progress
from core.session import InspectionSession

log = logging.getLogger(__name__)


def gui_runtime() -> str:
    """The inspection runtime inside the window: ``OKNG_RUNTIME`` if set, else ONNX Runtime.

    Not OpenVINO by default here: with OpenVINO compiling and running on the engine thread,
    Qt's text layout on the UI thread crashed (segfault in QGraphicsTextItem.setHtml, every
    run of tests/gui/test_end_to_end.py); torch and ONNX Runtime run clean in the window.
    The command line has no Qt and keeps the fastest (OpenVINO)."""
    return os.environ.get("OKNG_RUNTIME") or "onnxruntime"


def _app_data(sub: str) -> Path:
    loc = QStandardPaths.StandardLocation.AppDataLocation
    return Path(QStandardPaths.writableLocation(loc)) / sub


class StationController(QObject):
    # the session's notifications, as Qt signals (GUI thread)
    model_changed = Signal()
    ok_paths_changed = Signal(list)
    unreadable_ok_changed = Signal(dict)  # path -> why the last fit could not read it
    recipe_changed = Signal(str)
    thresholds_changed = Signal(float, float)
    results_changed = Signal()
    result_added = Signal(object)  # ResultRecord
    display_changed = Signal(object)  # Display of the shown result
    live_changed = Signal(bool)
    status = Signal(str)
    error = Signal(str)
    question_asked = Signal(object)  # core.events.Question
    # the labels' notifications
    labels_changed = Signal(list)  # [LabelRow]
    weights_changed = Signal(object)  # WeightChange | None
    weights_held_back = Signal(str)  # why the last label's reweighting was held back, or ""
    selection_changed = Signal(object)  # (N, 2) contour or None
    can_undo_changed = Signal(bool)
    label_saved = Signal(int)
    reweight_changed = Signal(bool)
    counters_changed = Signal(object)  # core.results_log.Counters | None
    dirty_changed = Signal(bool)
    role_changed = Signal(str)
    # the engine's
    busy_changed = Signal(bool)
    progress = Signal(int, int, str)

    def __init__(self, runner, parent: QObject | None = None, labels_dir: str | Path | None = None,
                 captures_dir: str | Path | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        self.session = s = InspectionSession(
            runner, labels_dir if labels_dir is not None else _app_data("labels"),
            captures_dir if captures_dir is not None else _app_data("captures"), runtime=gui_runtime())
        self._render_pending = False
        for name in ("model_changed", "ok_paths_changed", "unreadable_ok_changed", "recipe_changed",
                     "thresholds_changed", "results_changed",
                     "result_added", "live_changed", "status", "error", "dirty_changed", "role_changed"):
            getattr(s, name).connect(getattr(self, name).emit)
        for name in ("labels_changed", "weights_changed", "weights_held_back", "selection_changed",
                     "can_undo_changed", "label_saved", "reweight_changed"):
            getattr(s.labels, name).connect(getattr(self, name).emit)
        s.question.connect(self.question_asked.emit)
        s.shift.counters_changed.connect(self.counters_changed.emit)
        s.shown_changed.connect(lambda _id: self.schedule_render())
        s.results_changed.connect(self.schedule_render)
        s.thresholds_changed.connect(lambda *_: self.schedule_render())
        runner.busy_changed.connect(self.busy_changed)
        runner.progress.connect(self._on_runner_progress)

    @property
    def labels(self):
        return self.session.labels

    @Slot(object)
    def _on_runner_progress(self, p: Progress) -> None:
        self.progress.emit(p.done, p.total, p.message)

    def schedule_render(self) -> None:
        """Several changes during one paint collapse into one render of the shown result."""
        if not self._render_pending and self.session.shown_id is not None:
            self._render_pending = True
            QTimer.singleShot(0, self._render)

    @Slot()
    def _render(self) -> None:
        self._render_pending = False
        d = self.session.display()
        if d is not None:
            self.display_changed.emit(d)

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        self.session.labels.close_store()
        self.session.shift.close()
        return self.runner.shutdown(timeout_ms)
