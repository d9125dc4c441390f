"""An asyncio server on a thread of its own, as both line links run (Modbus TCP, OPC UA).

``start()`` returns once the server serves, or raises the error that kept it from serving;
an error after that is logged (the line service reports the link as down). ``stop()`` asks
the server's loop to end and joins the thread.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class ServerThread:
    #: the thread's name (``line-modbus``, ``line-opcua``)
    thread_name = "line-server"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def where(self) -> str:
        """What serves where, for messages: "Modbus server on 0.0.0.0:5020"."""
        raise NotImplementedError

    async def _serve(self) -> None:
        """Serve until asked to stop; call :meth:`_serving` once clients can connect."""
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"{self.where()} did not start in {timeout:g} s")
        if self._error is not None:
            raise self._error

    def _serving(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started.set()

    def _stop_on_loop(self, ask: Callable[[asyncio.AbstractEventLoop], object]) -> None:
        """Run ``ask(loop)`` (thread-safe: it must only schedule) if the server is up, then
        wait up to 10 s for its thread to end."""
        if self._loop is not None and self._thread is not None:
            ask(self._loop)
            self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            self._error = exc
            if self._started.is_set():
                log.exception("%s stopped", self.where())
            self._started.set()
