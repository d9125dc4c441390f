"""ResultsPanel: one row per inspected image (thumbnail, name, score, verdict, time)."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..imaging import thumbnail_icon

COLUMNS = ["", "image", "score", "verdict", "time (ms)"]
VERDICT_COLOURS = {"OK": QColor(200, 240, 205), "NG": QColor(250, 190, 190), "?": QColor(230, 230, 230)}
MAX_ROWS = 500


class ResultsPanel(QWidget):
    result_selected = Signal(int)  # result id

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setIconSize(QSize(40, 40))
        self.table.verticalHeader().setDefaultSectionSize(44)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.setColumnWidth(0, 48)
        self.table.itemSelectionChanged.connect(self._on_selection)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.table)

    def add_result(self, result_id: int, name: str, score: float, verdict: str, seconds: float,
                   thumbnail: np.ndarray | None = None) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        icon_item = QTableWidgetItem()
        if thumbnail is not None:
            icon_item.setIcon(thumbnail_icon(thumbnail, 40))
        icon_item.setData(Qt.ItemDataRole.UserRole, result_id)
        score_item = QTableWidgetItem(f"{score:.3f}")
        score_item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        items = [icon_item, QTableWidgetItem(name), score_item, QTableWidgetItem(verdict),
                 QTableWidgetItem(f"{seconds * 1000:.0f}")]
        for col, item in enumerate(items):
            self.table.setItem(row, col, item)
        self._paint_verdict(row, verdict)
        while self.table.rowCount() > MAX_ROWS:
            self.table.removeRow(0)
        self.table.scrollToBottom()

    def _paint_verdict(self, row: int, verdict: str, changed_from: str | None = None) -> None:
        item = self.table.item(row, 3)
        item.setText(verdict if not changed_from else f"{changed_from} → {verdict}")
        item.setToolTip("" if not changed_from else f"was {changed_from} before the last label changed the model")
        item.setBackground(QBrush(VERDICT_COLOURS.get(verdict, QColor(255, 255, 255))))

    def set_verdicts(self, verdicts: dict[int, str], scores: dict[int, float] | None = None,
                     changed_from: dict[int, str] | None = None) -> None:
        """Re-paint verdicts (and scores, after a label re-judged them) by result id; a verdict
        a label flipped shows as "NG → OK"."""
        changed_from = changed_from or {}
        for row in range(self.table.rowCount()):
            rid = self.table.item(row, 0).data(Qt.ItemDataRole.UserRole)
            if rid in verdicts:
                self._paint_verdict(row, verdicts[rid], changed_from.get(rid))
            if scores and rid in scores:
                self.table.item(row, 2).setText(f"{scores[rid]:.3f}")

    def clear(self) -> None:
        self.table.setRowCount(0)

    def row_count(self) -> int:
        return self.table.rowCount()

    def selected_id(self) -> int | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return self.table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole)

    def select_row(self, row: int) -> None:
        if 0 <= row < self.table.rowCount():
            self.table.selectRow(row)

    def select_next(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        current = rows[0].row() if rows else -1
        self.select_row(min(current + 1, self.table.rowCount() - 1))

    def _on_selection(self) -> None:
        rid = self.selected_id()
        if rid is not None:
            self.result_selected.emit(rid)
