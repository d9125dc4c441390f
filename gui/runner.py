"""EngineRunner: one engine thread running generator jobs ``job(token)``, one after another.

``submit(job, callbacks)`` queues a job; its events come back on the GUI thread to that
job's own callbacks (:class:`core.jobs.JobCallbacks`): no tag strings, no routing. The
runner's Qt signals (``progress``, ``busy_changed``) serve the progress bar. Cancellation is
cooperative: the token is set and the job stops at its next yield or token check. Never
``QThread.terminate()``. The same contract as :class:`core.jobs.InlineExecutor`, so an
:class:`~core.session.InspectionSession` runs unchanged on either.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, QThread, Signal, Slot

from core.jobs import CancelToken, JobCallbacks, Progress, deliver, drive

log = logging.getLogger(__name__)


@dataclass
class JobHandle:
    id: int
    callbacks: JobCallbacks
    token: CancelToken = field(default_factory=CancelToken)


class _BaseRunner(QObject):
    started = Signal()
    progress = Signal(object)  # Progress of whichever job runs
    busy_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._pending: dict[int, JobHandle] = {}

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def cancel(self) -> None:
        """Cancel the running job and every queued one."""
        for h in self._pending.values():
            h.token.cancel()

    def _new_handle(self, callbacks: JobCallbacks | None, replace: bool) -> JobHandle:
        if replace:
            self.cancel()
        h = JobHandle(next(self._ids), callbacks or JobCallbacks())
        was_busy = self.busy
        self._pending[h.id] = h
        if not was_busy:
            self.busy_changed.emit(True)
        return h

    def _deliver(self, job_id: int, kind: str, payload: object) -> None:
        h = self._pending.get(job_id)
        if h is None:
            return
        if kind == "started":
            self.started.emit()
            return
        if kind == "progress" and isinstance(payload, Progress):
            self.progress.emit(payload)
        final = kind in ("returned", "failed", "cancelled")
        if final:  # no longer pending while its last callback runs: it may submit the next job
            del self._pending[job_id]
        try:
            deliver(h.callbacks, kind, payload)
        finally:
            if final and not self._pending:
                self.busy_changed.emit(False)


class _JobWorker(QObject):
    """Lives in the engine thread; runs one job per queued ``run`` call."""

    event = Signal(int, str, object)

    @Slot(object, object)
    def run(self, handle: JobHandle, job: Callable) -> None:
        drive(job, handle.token, lambda kind, payload: self.event.emit(handle.id, kind, payload))


class EngineRunner(_BaseRunner):
    """Runs jobs serially in one QThread; callbacks run in the GUI thread."""

    _run_requested = Signal(object, object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thread = QThread()
        self._thread.setObjectName("okng-engine")
        self._worker = _JobWorker()
        self._worker.moveToThread(self._thread)
        self._run_requested.connect(self._worker.run)
        self._worker.event.connect(self._on_worker_event)
        self._thread.start()

    @property
    def thread(self) -> QThread:
        return self._thread

    def submit(self, job: Callable, callbacks: JobCallbacks | None = None, replace: bool = False) -> JobHandle:
        """Queue ``job(token)``; with ``replace`` the running and queued jobs are cancelled first."""
        if not self._thread.isRunning():
            raise RuntimeError("the engine runner has been shut down")
        h = self._new_handle(callbacks, replace)
        log.debug("submit job %s", h.id)
        self._run_requested.emit(h, job)
        return h

    @Slot(int, str, object)
    def _on_worker_event(self, job_id: int, kind: str, payload: object) -> None:
        self._deliver(job_id, kind, payload)

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        """Cancel everything, stop the thread; False (and a log line) if it did not stop in time."""
        self.cancel()
        self._thread.quit()
        ok = self._thread.wait(timeout_ms)
        if not ok:
            log.error("engine thread did not stop within %d ms", timeout_ms)
        return ok


class SyncRunner(_BaseRunner):
    """Same signals and callbacks, but runs each job inline in the caller's thread (tests)."""

    def submit(self, job: Callable, callbacks: JobCallbacks | None = None, replace: bool = False) -> JobHandle:
        h = self._new_handle(callbacks, replace)
        drive(job, h.token, lambda kind, payload: self._deliver(h.id, kind, payload))
        return h

    def shutdown(self, timeout_ms: int = 0) -> bool:
        self.cancel()
        return True
