"""EngineRunner: one engine thread running generator jobs ``job(token)``, one after another.

A job is a callable taking a cancel token and returning a generator; every yielded value is
reported (``progress`` for Progress values, ``yielded`` for their ``item`` or any other value),
the generator's return value goes to ``returned``. Cancellation is cooperative: the token is
set and the job stops at its next yield or token check. Never ``QThread.terminate()``.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

from core.errors import Cancelled
from core.jobs import CancelToken as Token
from core.jobs import Progress

log = logging.getLogger(__name__)


@dataclass
class JobHandle:
    id: int
    tag: str = ""
    token: Token = field(default_factory=Token)


def _drive(handle: JobHandle, job: Callable[[Token], Any], emit) -> None:
    """Run one job to its end, reporting through ``emit(kind, handle_id, payload)``."""
    token = handle.token
    if token.cancelled:
        emit("cancelled", handle.id, None)
        return
    emit("started", handle.id, None)
    gen = None
    try:
        gen = job(token)
        while True:
            token.raise_if_cancelled()
            value = next(gen)
            if isinstance(value, Progress):
                emit("progress", handle.id, value)
                if value.item is not None:
                    emit("yielded", handle.id, value.item)
            else:
                emit("yielded", handle.id, value)
    except StopIteration as stop:
        emit("returned", handle.id, stop.value)
    except Exception as exc:  # reported, never swallowed
        if isinstance(exc, Cancelled):
            log.debug("job %s cancelled", handle.id)
            emit("cancelled", handle.id, None)
        else:
            log.exception("job %s failed", handle.id)
            emit("failed", handle.id, exc)
    finally:
        if gen is not None and hasattr(gen, "close"):
            gen.close()  # runs the job's own finally: (release the camera, ...)


class _RunnerSignals(QObject):
    started = Signal()
    progress = Signal(object)
    yielded = Signal(object)
    returned = Signal(object)
    failed = Signal(object)
    cancelled = Signal()
    busy_changed = Signal(bool)


class _BaseRunner(_RunnerSignals):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._pending: dict[int, JobHandle] = {}
        self.current: JobHandle | None = None  # the job whose signals are being delivered

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def cancel(self) -> None:
        """Cancel the running job and every queued one."""
        for h in self._pending.values():
            h.token.cancel()

    def _new_handle(self, tag: str, replace: bool) -> JobHandle:
        if replace:
            self.cancel()
        h = JobHandle(next(self._ids), tag)
        was_busy = self.busy
        self._pending[h.id] = h
        if not was_busy:
            self.busy_changed.emit(True)
        return h

    def _deliver(self, kind: str, job_id: int, payload: object) -> None:
        h = self._pending.get(job_id)
        if h is None:
            return
        self.current = h
        if kind == "started":
            self.started.emit()
        elif kind == "progress":
            self.progress.emit(payload)
        elif kind == "yielded":
            self.yielded.emit(payload)
        else:
            if kind == "returned":
                self.returned.emit(payload)
            elif kind == "failed":
                self.failed.emit(payload)
            elif kind == "cancelled":
                self.cancelled.emit()
            del self._pending[job_id]
            self.current = None
            if not self._pending:
                self.busy_changed.emit(False)


class _JobWorker(QObject):
    """Lives in the engine thread; runs one job per queued ``run`` call."""

    event = Signal(str, int, object)

    @Slot(object, object)
    def run(self, handle: JobHandle, job: Callable) -> None:
        _drive(handle, job, self.event.emit)


class EngineRunner(_BaseRunner):
    """Runs jobs serially in one QThread; signals arrive in the GUI thread."""

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

    def submit(self, job: Callable, replace: bool = False, tag: str = "") -> JobHandle:
        """Queue ``job(token)``; with ``replace`` the running and queued jobs are cancelled first."""
        if not self._thread.isRunning():
            raise RuntimeError("the engine runner has been shut down")
        h = self._new_handle(tag, replace)
        log.debug("submit job %s (%s)", h.id, tag)
        self._run_requested.emit(h, job)
        return h

    @Slot(str, int, object)
    def _on_worker_event(self, kind: str, job_id: int, payload: object) -> None:
        self._deliver(kind, job_id, payload)

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        """Cancel everything, stop the thread; False (and a log line) if it did not stop in time."""
        self.cancel()
        self._thread.quit()
        ok = self._thread.wait(timeout_ms)
        if not ok:
            log.error("engine thread did not stop within %d ms", timeout_ms)
        return ok


class SyncRunner(_BaseRunner):
    """Same signals, but runs each job inline in the caller's thread (for tests)."""

    def submit(self, job: Callable, replace: bool = False, tag: str = "") -> JobHandle:
        h = self._new_handle(tag, replace)
        _drive(h, job, self._deliver)
        return h

    def shutdown(self, timeout_ms: int = 0) -> bool:
        self.cancel()
        return True
