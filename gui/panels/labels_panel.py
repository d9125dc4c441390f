"""LabelsPanel: operator labels (click-to-label feedback), undo, export and what the model changed.

Plain widgets fed plain data: rows are objects with ``id, created_at, image_name, kind,
score_before, score_after, undone`` (see ``gui.feedback.LabelRow``); the weight change is any
object with ``strength, stage_mean_weight, lowest`` (``core.feedback.WeightChange``) or None.
"""
from __future__ import annotations

import html
import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMenu,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

COLUMNS = ["time", "image", "label", "score before → after"]
KIND_TEXT = {"false_alarm": "false alarm", "defect": "real defect", "image_ok": "part OK", "image_ng": "part NG"}
EXPORT_FILTER = "CSV (*.csv);;JSON (*.json)"


REWEIGHT_TIP = ("Besides adding false alarms to the OK memory, lower the channels that drive them "
                "(never so far that a confirmed defect passes). Off by default: see the README's "
                "feedback figures for what it bought on the demo data.")
NO_WEIGHTS_TIP = ("this model learns no channel weights (a trained model: its scores are normalised per "
                  "position); false-alarm labels teach its OK memory")


class LabelsPanel(QWidget):
    mark_requested = Signal(str)  # "false_alarm" | "defect" | "image_ok" | "image_ng"
    undo_requested = Signal()
    export_requested = Signal(str)  # target path, .csv or .json
    reset_weights_requested = Signal()
    operator_changed = Signal(str)
    reweight_toggled = Signal(bool)
    withdraw_requested = Signal(int)  # label id: no refit replays it any more
    restore_requested = Signal(int)  # label id: active again

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._ready = False  # a model to label against
        self._unlocked = True  # engineer mode
        self._weighted = False  # the model holds channel weights (Reset weights has work)
        self._learnable = True  # the model learns channel weights
        self.operator_edit = QLineEdit()
        self.operator_edit.setPlaceholderText("your name")
        self.operator_edit.editingFinished.connect(lambda: self.operator_changed.emit(self.operator()))
        self.false_alarm_button = QPushButton("False alarm  (F)")
        self.false_alarm_button.setToolTip("The selected region is fine: teach the model (F)")
        self.defect_button = QPushButton("Real defect  (D)")
        self.defect_button.setToolTip("The selected region is a real defect (D)")
        self.part_ok_button = QPushButton("Part is OK  (O)")
        self.part_ok_button.setToolTip("The whole part is OK: add it to the OK memory (O)")
        self.part_ng_button = QPushButton("Part is NG  (N)")
        self.part_ng_button.setToolTip("The whole part is defective (N)")
        for b, kind in ((self.false_alarm_button, "false_alarm"), (self.defect_button, "defect"),
                        (self.part_ok_button, "image_ok"), (self.part_ng_button, "image_ng")):
            b.clicked.connect(lambda _=False, k=kind: self.mark_requested.emit(k))
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._row_menu)
        self.table.setToolTip("Right-click a label to withdraw it (no fit replays it) or restore it")
        self._undone: dict[int, bool] = {}  # label id -> undone, for the row menu
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for col in (0, 2, 3):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.undo_button = QPushButton("Undo last  (Ctrl+Z)")
        self.undo_button.clicked.connect(self.undo_requested)
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(self._ask_export)
        self.reset_button = QPushButton("Reset weights")
        self.reset_button.setToolTip("Set every channel weight back to 1 (the OK memory added stays)")
        self.reset_button.clicked.connect(self.reset_weights_requested)
        self.reweight_check = QCheckBox("Learn channel weights")
        self.reweight_check.setToolTip(REWEIGHT_TIP)
        self.reweight_check.toggled.connect(self.reweight_toggled)
        self.changed_label = QLabel()
        self._weights_html, self._held_back = "", ""
        self.changed_label.setWordWrap(True)
        self.changed_label.setTextFormat(Qt.TextFormat.RichText)
        self.changed_label.setStyleSheet("background:#f4f4f4; padding:4px;")

        marks = QGridLayout()
        marks.addWidget(self.false_alarm_button, 0, 0)
        marks.addWidget(self.defect_button, 0, 1)
        marks.addWidget(self.part_ok_button, 1, 0)
        marks.addWidget(self.part_ng_button, 1, 1)
        top = QHBoxLayout()
        top.addWidget(QLabel("Operator"))
        top.addWidget(self.operator_edit, 1)
        bottom = QHBoxLayout()
        bottom.addWidget(self.undo_button)
        bottom.addWidget(self.export_button)
        bottom.addStretch(1)
        bottom.addWidget(self.reweight_check)
        bottom.addWidget(self.reset_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(top)
        lay.addLayout(marks)
        lay.addWidget(self.table, 1)
        lay.addLayout(bottom)
        lay.addWidget(self.changed_label)
        self.set_region_selected(False)
        self.set_can_undo(False)
        self.set_weight_change(None)
        self.set_model_ready(False)

    # -- state --------------------------------------------------------------------------------------
    def operator(self) -> str:
        return self.operator_edit.text().strip()

    def set_operator(self, name: str) -> None:
        self.operator_edit.setText(name)

    def set_region_selected(self, selected: bool) -> None:
        self.false_alarm_button.setEnabled(selected)
        self.defect_button.setEnabled(selected)

    def set_model_ready(self, ready: bool) -> None:
        self._ready = ready
        self.part_ok_button.setEnabled(ready)
        self.part_ng_button.setEnabled(ready)
        self._update_engineer_controls()

    def set_engineer_controls(self, unlocked: bool) -> None:
        """Channel weights change how every later part is scored: an engineer's setting, like
        the thresholds. In operator mode both controls are off (labels stay allowed)."""
        self._unlocked = unlocked
        self._update_engineer_controls()

    def set_weights_learnable(self, learnable: bool) -> None:
        """Whether the current model learns channel weights at all (trained models do not)."""
        was, self._learnable = self._learnable, learnable
        self.reweight_check.setToolTip(REWEIGHT_TIP if learnable else NO_WEIGHTS_TIP)
        self._update_engineer_controls()
        if learnable != was or not learnable:
            self.set_weight_change(None)

    def _update_engineer_controls(self) -> None:
        self.reset_button.setEnabled(self._ready and self._unlocked and self._learnable and self._weighted)
        self.reset_button.setToolTip("Set every channel weight back to 1 (the OK memory added stays)"
                                     if self._weighted else "The model holds no channel weights to reset")
        self.reweight_check.setEnabled(self._unlocked and self._learnable)

    def set_reweight(self, on: bool) -> None:
        """Show what the current model does, without echoing it back as a toggle."""
        blocked = self.reweight_check.blockSignals(True)
        self.reweight_check.setChecked(on)
        self.reweight_check.blockSignals(blocked)

    def set_can_undo(self, can: bool) -> None:
        self.undo_button.setEnabled(can)

    def set_rows(self, rows: list) -> None:
        self._undone = {row.id: row.undone for row in rows}
        self.table.setRowCount(len(rows))
        grey = QBrush(QColor(150, 150, 150))
        for r, row in enumerate(rows):
            when = time.strftime("%H:%M:%S", time.localtime(row.created_at)) if row.created_at else ""
            if row.score_before is None:
                scores = ""
            elif row.score_after is None:
                scores = f"{row.score_before:.2f}"
            else:
                scores = f"{row.score_before:.2f} → {row.score_after:.2f}"
            kind, tips = KIND_TEXT.get(row.kind, row.kind), [_undone_by(row)]
            if row.undone and row.in_model:  # withdrawn, or undone after the model was saved
                kind += "  (withdrawn, until refit)"
                tips.append("No fit replays this label, but the current model still holds it until you fit "
                            "again (F5)")
            elif row.undone:
                kind += "  (undone)"
            elif not row.in_model:
                kind += "  (not in model)"  # e.g. its image changed since; a refit could not replay it
                tips.append("The current model has not learnt this label (made after the model was saved, or "
                            "its image changed since): a fit (F5) replays it if its image is still there")
            tip = "\n".join(t for t in tips if t)
            for c, text in enumerate((when, row.image_name, kind, scores)):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, row.id)
                item.setToolTip(tip if c == 2 else text if c == 1 else "")
                if c == 3:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if row.undone:
                    item.setForeground(grey)
                    f = QFont(item.font())
                    f.setStrikeOut(True)
                    item.setFont(f)
                self.table.setItem(r, c, item)
        self.export_button.setEnabled(bool(rows))
        self.table.scrollToBottom()

    def set_weight_change(self, change) -> None:
        """What the weights are now (None: the model holds none); clears the note of what the
        guard held back."""
        self._held_back = ""
        self._weighted = change is not None
        self._update_engineer_controls()
        if change is None and not self._learnable:
            self._weights_html = f"<b>What changed:</b> {NO_WEIGHTS_TIP}"
        elif change is None:
            self._weights_html = ("<b>What changed:</b> channel weights unchanged (with "
                                  "<i>Learn channel weights</i> on, a false alarm lowers the "
                                  "channels that drove it)")
        else:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in change.stage_mean_weight.items())
            lowest = ", ".join(f"#{i} {w:.2f}" for i, w in change.lowest)
            title = ("<b>Channel weights the model holds</b>" if change.strength is None
                     else f"<b>What changed</b> (strength {change.strength:g})")
            self._weights_html = f"{title}<br>mean weight per stage: {stages}<br>most lowered channels: {lowest}"
        self._show_changed()

    def set_held_back(self, text: str) -> None:
        """Why the last label's reweighting was held back (the guard's refusal), or ""."""
        self._held_back = text
        self._show_changed()

    def _show_changed(self) -> None:
        note = f"<br><span style='color:#a05a00'>{html.escape(self._held_back)}</span>" if self._held_back else ""
        self.changed_label.setText(self._weights_html + note)

    def row_menu(self, label_id: int) -> QMenu:
        """The actions on one label: withdraw an active one, restore an undone one."""
        menu = QMenu(self)
        if self._undone.get(label_id):
            act = menu.addAction(f"Restore label #{label_id} (the next fit replays it)")
            act.triggered.connect(lambda: self.restore_requested.emit(label_id))
        else:
            act = menu.addAction(f"Withdraw label #{label_id} (no fit replays it)")
            act.triggered.connect(lambda: self.withdraw_requested.emit(label_id))
        act.setEnabled(self._unlocked)
        if not self._unlocked:
            act.setToolTip("Engineer mode: unlock the station to change the labels")
        return menu

    def _row_menu(self, pos) -> None:
        item = self.table.itemAt(pos)
        if item is None:
            return
        menu = self.row_menu(int(item.data(Qt.ItemDataRole.UserRole)))
        menu.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        menu.popup(self.table.viewport().mapToGlobal(pos))

    # -- export ---------------------------------------------------------------------------------------
    def _ask_export(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(self, "Export labels", "labels.csv", EXPORT_FILTER)
        if path:
            if not path.lower().endswith((".csv", ".json")):
                path += ".json" if "json" in chosen.lower() else ".csv"
            self.export_requested.emit(path)


def _undone_by(row) -> str:
    """Who took an undone label out, and when (the store records it), as a tooltip's line."""
    at, by = getattr(row, "undone_at", None), getattr(row, "undone_by", "")
    if not row.undone or at is None:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(at))
    return f"Taken out {when}" + (f" by {by}" if by else "") + "."
