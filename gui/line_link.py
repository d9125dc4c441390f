"""The window serving a PLC: ``okng serve`` on the open recipe, with the window's own model.

One engine, one source of truth: triggers inspect with the session's current detector and
thresholds (a refit or a threshold change applies from the next part) and log to the
recipe's results log, beside the window's own inspections. Images come from the demo stream
when the demo is open, else from the live source set in the Inspect panel (camera, video,
watched folder). Endpoints are recipe station settings: ``line_opcua`` (default 4840),
``line_modbus`` (default 5020; 502 needs root on Linux), ``line_mqtt`` (HOST[:PORT], none by
default). The link state is polled twice a second and handed to the LinkPanel as plain data;
the shift counters are refreshed from the log when the line has inspected.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from core.errors import OkngError

DEFAULT_OPCUA, DEFAULT_MODBUS = "4840", "5020"


class LineLink(QObject):
    started = Signal(bool)  # True: serving; False: could not start (see failed)
    failed = Signal(str)
    state = Signal(object)  # LineService.status() dict, or None when stopped

    def __init__(self, session, live_source, parent: QObject | None = None) -> None:
        """``live_source()`` -> (kind, target) of the Inspect panel."""
        super().__init__(parent)
        self.session, self.live_source = session, live_source
        self.service = None
        self._cycles = 0
        self._skipped = 0  # skipped images already said
        self._timer = QTimer(self)
        self._timer.setInterval(500)
        self._timer.timeout.connect(self._tick)
        self.started.connect(self._on_started)

    @property
    def serving(self) -> bool:
        return self.service is not None

    def start(self) -> None:
        """Build the service here (fast); start its links on a thread (an OPC UA server takes
        a few seconds): ``started`` says how it went."""
        if self.service is not None:
            return
        try:
            service = self._build()
        except (OkngError, ValueError, OSError, sqlite3.Error) as exc:
            self.failed.emit(f"The line links did not start: {exc}")
            self.started.emit(False)
            return
        self.service = service
        self._skipped = 0  # a new source: its own count
        threading.Thread(target=self._start, args=(service,), name="line-start", daemon=True).start()

    def _build(self):
        from core.line import require
        from core.line.service import LineService, ServeOptions, WindowRecipe

        s = self.session
        st = s.recipe.station
        mqtt = st.get("line_mqtt") or None
        require("asyncua", "pymodbus", *(["paho"] if mqtt else []))
        window = WindowRecipe(s.recipe.name, s.shift.path, s.current_detector, lambda: s.labels.current_model_id,
                              dict(st), lambda: bool(s.recipe.station.get("copy_ng_images")))
        return LineService(ServeOptions([], self._source(), opcua=str(st.get("line_opcua") or DEFAULT_OPCUA),
                                        modbus=str(st.get("line_modbus") or DEFAULT_MODBUS), mqtt=mqtt,
                                        operator=s.operator or "line", window=window))

    def _source(self):
        from core.line.sources import LiveGrab, Playlist

        kind, target = self.live_source()
        # a folder or video chosen in the Inspect panel comes first; the panel's camera is its
        # default (index 0), so with the demo open the demo stream plays instead
        if self.session.demo_stream and not (target and kind in ("folder", "video")):
            return Playlist(list(self.session.demo_stream))
        if not target:
            raise OkngError("set a live source in the Inspect panel (camera, video or folder): triggers take "
                            "their image from it")
        from core.sources import FolderWatchSource, VideoSource

        return LiveGrab(FolderWatchSource(target) if kind == "folder" else VideoSource(target))

    def _start(self, service) -> None:
        try:
            service.start()
        except Exception as exc:  # noqa: BLE001 - shown in the window, never a crash
            service.stop()
            self.failed.emit(f"The line links did not start: {exc}")
            self.started.emit(False)
            return
        self.started.emit(True)

    def _on_started(self, ok: bool) -> None:
        if ok:
            self._timer.start()
            self._tick()
        else:
            self.service = None

    def stop(self) -> None:
        service, self.service = self.service, None
        self._timer.stop()
        if service is not None:
            service.stop()
        self.state.emit(None)

    def _tick(self) -> None:
        if self.service is not None:
            status = self.service.status()
            if status["cycles"] != self._cycles:  # the line's results count in the shift: counters from the log
                self._cycles = status["cycles"]
                self.session.shift.refresh()
            skipped, total = status.get("skipped", []), status.get("skipped_total", 0)
            if total > self._skipped:  # said where the operator reads (the Messages tab keeps it)
                names = ", ".join(Path(p).name for p in skipped[-min(total - self._skipped, len(skipped)):])
                self.session.status.emit(f"Line: skipped {names}: appeared while the previous part waited for its "
                                         "image (a second frame for one trigger, or an image still being written "
                                         "when its part timed out); not judged")
            self._skipped = total
            self.state.emit(status)


def install_line_link(window) -> LineLink:
    """The Line dock (LinkPanel), the Inspect menu's serve action, and the wiring."""
    from .panels.link_panel import LinkPanel

    sp = window.source_panel
    link = LineLink(window.controller.session, lambda: (sp.live_kind(), sp.target_edit.text().strip()), window)
    panel = window.link_panel = LinkPanel()
    dock = window.add_dock("Line", panel, window.dockWidgetArea(window.shift_dock))
    window.tabifyDockWidget(window.shift_dock, dock)
    action = window.line_action = window.add_action(window.inspect_menu, "Serve the &line (PLC trigger)",
                                                    lambda: panel.serve_requested.emit(not link.serving))

    def request(serve: bool) -> None:
        if serve:
            panel.set_starting()
            link.start()
        else:
            link.stop()

    def started(ok: bool) -> None:
        panel.set_ready()
        panel.set_serving(ok)
        action.setText("Stop serving the &line" if ok else "Serve the &line (PLC trigger)")

    def stopped(state) -> None:
        panel.set_state(state)
        if state is None:
            action.setText("Serve the &line (PLC trigger)")

    panel.serve_requested.connect(request)
    link.started.connect(started)
    link.failed.connect(window.show_error)
    link.state.connect(stopped)
    window.controller.recipe_changed.connect(lambda _name: link.stop() if link.serving else None)
    return link
