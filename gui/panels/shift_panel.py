"""ShiftPanel: shift counters (total, OK, NG, yield, parts/min), the confusion matrix when the
truth is known, reset and export of the results log.

Fed plain values (an object with the fields of ``core.results_log.Counters``); emits intents.
"""
from __future__ import annotations

import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QGridLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout,
                               QWidget)


VALUE_STYLE = "font-size:15px; font-weight:bold;"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


class ShiftPanel(QWidget):
    reset_requested = Signal()
    review_requested = Signal()
    export_requested = Signal(str, bool, bool)  # path, NG only, this shift only
    copy_ng_toggled = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values: dict[str, QLabel] = {}
        grid = QGridLayout()
        for i, (key, text) in enumerate([("total", "Inspected"), ("ok", "OK"), ("ng", "NG"), ("unjudged", "No verdict"),
                                         ("errors", "Errors"), ("yield", "Yield"), ("ppm", "Parts / min")]):
            name, value = QLabel(text), QLabel("—")
            value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            value.setStyleSheet(VALUE_STYLE)
            grid.addWidget(name, i // 2, (i % 2) * 2)
            grid.addWidget(value, i // 2, (i % 2) * 2 + 1)
            self.values[key] = value
            if key == "errors":
                tip = ("Parts the line sent on without a verdict: no image in time, an unreadable image, a failed "
                       "inspection (the results log and its export give each one's reason)")
                name.setToolTip(tip)
                value.setToolTip(tip)
        self.since_label = QLabel("No inspection in this shift yet")
        self.truth_label = QLabel("")
        self.truth_label.setWordWrap(True)
        self.truth_label.setTextFormat(Qt.TextFormat.RichText)
        self.reset_button = QPushButton("Reset counters")
        self.reset_button.setToolTip("Start a new shift: the counters count from now; the log keeps every result")
        self.review_button = QPushButton("Review NG of this shift")
        self.review_button.setToolTip("Show this shift's NG parts and failed cycles (a line's night, too) in the "
                                      "results table with their heat maps, to label false alarms; they are not "
                                      "logged or counted again")
        self.review_button.clicked.connect(self.review_requested)
        self.export_button = QPushButton("Export log…")
        self.ng_only_check = QCheckBox("NG only")
        self.shift_only_check = QCheckBox("this shift only")
        self.copy_ng_check = QCheckBox("Keep copies of NG images")
        self.copy_ng_check.setToolTip("Save each NG image as PNG beside the recipe (<recipe>.ng/)")
        self.reset_button.clicked.connect(self.reset_requested)
        self.export_button.clicked.connect(self._ask_export)
        self.copy_ng_check.toggled.connect(self.copy_ng_toggled)
        buttons = QHBoxLayout()
        for w in (self.reset_button, self.export_button, self.ng_only_check, self.shift_only_check):
            buttons.addWidget(w)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.addLayout(grid)
        lay.addWidget(self.since_label)
        lay.addWidget(self.truth_label)
        lay.addLayout(buttons)
        lay.addWidget(self.review_button)
        lay.addWidget(self.copy_ng_check)
        lay.addStretch(1)

    def set_counters(self, c) -> None:
        """``c``: an object with total, ok, ng, unjudged, errors, since, yield_rate, parts_per_minute,
        confusion {(truth, verdict): n} and rates(); or None when nothing was inspected."""
        if c is None:
            for v in self.values.values():
                v.setText("—")
            self.values["errors"].setStyleSheet(VALUE_STYLE)
            self.since_label.setText("No inspection in this shift yet")
            self.truth_label.setText("")
            return
        self.values["total"].setText(str(c.total))
        self.values["ok"].setText(str(c.ok))
        self.values["ng"].setText(str(c.ng))
        self.values["unjudged"].setText(str(c.unjudged))
        errors = int(getattr(c, "errors", 0))
        self.values["errors"].setText(str(errors))
        self.values["errors"].setStyleSheet(VALUE_STYLE + (" color:#b00;" if errors else ""))
        self.values["yield"].setText(_pct(c.yield_rate))
        ppm = c.parts_per_minute
        self.values["ppm"].setText("—" if ppm is None else f"{ppm:.1f}")
        self.since_label.setText(f"Since {time.strftime('%Y-%m-%d %H:%M', time.localtime(c.since))}")
        self.truth_label.setText(self._confusion_html(c))

    @staticmethod
    def _confusion_html(c) -> str:
        m = c.confusion
        if not m:
            return ("<i>No parts of known truth this shift (inspect folders named ok/ng, or the demo stream, "
                    "to see detection rates)</i>")
        r = c.rates()
        cell = "<td align='right' style='padding:0 8px'>{}</td>"
        rows = "".join(f"<tr><td>truth {t}</td>" + "".join(cell.format(m.get((t, v), 0)) for v in ("OK", "NG"))
                       + "</tr>" for t in ("OK", "NG"))
        return ("<table><tr><td></td><td><b>judged OK</b></td><td><b>judged NG</b></td></tr>" + rows + "</table>"
                f"detection {_pct(r['detection_rate'])}, false alarms {_pct(r['false_alarm_rate'])} "
                "(parts with known truth)")

    def set_copy_ng(self, on: bool) -> None:
        blocked = self.copy_ng_check.blockSignals(True)
        self.copy_ng_check.setChecked(on)
        self.copy_ng_check.blockSignals(blocked)

    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export results log", "results.csv", "CSV (*.csv)")
        if path:
            self.export_requested.emit(path if path.lower().endswith(".csv") else path + ".csv",
                                       self.ng_only_check.isChecked(), self.shift_only_check.isChecked())
