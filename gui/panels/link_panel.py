"""LinkPanel: the line link while the window serves a PLC (``okng serve`` inside the window):
the links and their connected PLCs, the last trigger, the last result sent, MQTT.

Fed plain data: :meth:`set_state` takes the dict of ``LineService.status()`` (or None when
not serving); emits ``serve_requested(bool)``.
"""
from __future__ import annotations

import time
from pathlib import PurePath

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none yet"
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def describe(state: dict) -> list[str]:
    """The state as lines of rich text (one per link, then trigger, result, MQTT)."""
    lines = []
    for link in state.get("links", []):
        n = link.get("clients", 0)
        who = f"<b>{n} PLC{'s' if n != 1 else ''} connected</b>" if n else "no PLC connected"
        lines.append(f"{link['protocol']} <code>{link['endpoint']}</code>: {who}")
    lines.append(f"Recipe {state.get('active_recipe', '—')} active; {state.get('cycles', 0)} cycles, "
                 f"{state.get('refused', 0)} triggers refused")
    lines.append(f"Last trigger: {_age(state.get('last_trigger_age'))}")
    r = state.get("last_result")
    if r is not None:
        score = "—" if r.get("score") is None else f"{r['score']:.4g}"
        colour = {"OK": "#070", "NG": "#b00"}.get(r["verdict"], "#555")
        lines.append(f"Last result: part {r['part_id']} <b style='color:{colour}'>{r['verdict']}</b> (score {score})")
    if state.get("skipped_total"):
        last = state.get("skipped") or [""]
        lines.append(f"<b style='color:#b35900'>{state['skipped_total']} image(s) skipped</b> as another part's "
                     f"(last: {PurePath(last[-1]).name}; see Messages)")
    if state.get("out_of_step"):
        lines.append(f"<b style='color:#b35900'>{state['out_of_step']} trigger(s) found several images waiting</b>: "
                     "the station runs behind the camera, or the camera writes more images than there are "
                     "triggers (each trigger takes the oldest)")
    for m in state.get("mqtt", []):
        up = "connected" if m.get("connected") else "<b style='color:#b00'>not connected</b>"
        lines.append(f"MQTT {m['broker']} <code>{m['topic']}</code>: {up}, {m.get('pending', 0)} waiting, "
                     f"last sent #{m.get('published_upto', 0)}")
    return lines


class LinkPanel(QWidget):
    serve_requested = Signal(bool)  # True: start serving the line; False: stop

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.serving = False
        self.button = QPushButton("Serve the line")
        self.button.setToolTip("Let a PLC trigger inspections of this recipe over OPC UA and Modbus TCP "
                               "(addresses: recipe settings line_opcua / line_modbus; results to line_mqtt)")
        self.button.clicked.connect(lambda: self.serve_requested.emit(not self.serving))
        self._last: tuple[dict, float] | None = None  # the last serve's state, and when it was seen
        self.state_label = QLabel(self.NOT_SERVING)
        self.state_label.setTextFormat(Qt.TextFormat.RichText)
        self.state_label.setWordWrap(True)
        self.state_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        lay = QVBoxLayout(self)
        lay.addWidget(self.button)
        lay.addWidget(self.state_label, 1)

    NOT_SERVING = "Not serving: the line cannot trigger this station"

    def set_serving(self, serving: bool) -> None:
        self.serving = serving
        self.button.setText("Stop serving the line" if serving else "Serve the line")
        if not serving:
            self.state_label.setText(self.NOT_SERVING + self._last_served())

    def _last_served(self) -> str:
        """What the last serve did, kept after it stopped (found trying the station: the next
        morning the dock only said "Not serving", nothing of the night)."""
        last = self._last
        if last is None:
            return ""
        state, until = last
        text = (f"<br>Last served until {time.strftime('%H:%M', time.localtime(until))}: "
                f"{state.get('cycles', 0)} cycles, {state.get('refused', 0)} triggers refused")
        r = state.get("last_result")
        if r is not None:
            score = "" if r.get("score") is None else f" (score {r['score']:.4g})"
            text += f"; last result part {r['part_id']} {r['verdict']}{score}"
        return text + " (the Shift tab counts them; Review NG of this shift shows them)"

    def set_starting(self) -> None:
        self.button.setEnabled(False)
        self.state_label.setText("Starting the line links…")

    def set_ready(self) -> None:
        self.button.setEnabled(True)

    def set_state(self, state: dict | None) -> None:
        if state is None:
            self.set_serving(False)
            return
        self._last = (state, time.time())
        self.state_label.setText("<br>".join(describe(state)))
