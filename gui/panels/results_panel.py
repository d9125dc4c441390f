"""ResultsPanel: one compact row per inspected image (thumbnail, name, score, verdict, time).

A filter bar above the table hides rows (it never deletes them): "All", "NG only" (the current
verdict is NG) or "Changed by a label" (the verdict shows "X → Y"), plus a free-text match on
the name. ``select_next`` walks the visible rows only.
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from ..imaging import thumbnail_icon

COLUMNS = ["", "image", "score", "verdict", "time (ms)"]
VERDICT_COLOURS = {"OK": QColor(200, 240, 205), "NG": QColor(250, 190, 190), "?": QColor(230, 230, 230)}
MAX_ROWS = 500
ROW_HEIGHT = 28
ICON = 24
SHOW_ALL, SHOW_NG, SHOW_CHANGED = "All", "NG only", "Changed by a label"
FILTERS = (SHOW_ALL, SHOW_NG, SHOW_CHANGED)
VERDICT_ROLE = Qt.ItemDataRole.UserRole  # on the verdict item: the current verdict
CHANGED_ROLE = Qt.ItemDataRole.UserRole + 1  # on the verdict item: the verdict before a label, or None


class ResultsPanel(QWidget):
    result_selected = Signal(int)  # result id

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.filter_combo = QComboBox()
        self.filter_combo.addItems(FILTERS)
        self.filter_combo.setToolTip("Show all results, only NG parts, or only verdicts a label changed")
        self.name_filter = QLineEdit()
        self.name_filter.setPlaceholderText("filter by name…")
        self.name_filter.setClearButtonEnabled(True)
        self.shown_label = QLabel("")
        self.shown_label.setStyleSheet("color:#555;")
        self.filter_combo.currentTextChanged.connect(lambda _: self.apply_filter())
        self.name_filter.textChanged.connect(lambda _: self.apply_filter())

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setIconSize(QSize(ICON, ICON))
        self.table.verticalHeader().setDefaultSectionSize(ROW_HEIGHT)
        self.table.verticalHeader().setMinimumSectionSize(ROW_HEIGHT)
        self.table.verticalHeader().setVisible(False)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for col, width in ((0, ICON + 8), (2, 64), (3, 78), (4, 64)):
            self.table.setColumnWidth(col, width)
        self.table.itemSelectionChanged.connect(self._on_selection)

        bar = QHBoxLayout()
        bar.setContentsMargins(0, 0, 0, 0)
        bar.addWidget(QLabel("Show"))
        bar.addWidget(self.filter_combo)
        bar.addWidget(self.name_filter, 1)
        bar.addWidget(self.shown_label)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addLayout(bar)
        lay.addWidget(self.table)

    # -- rows ------------------------------------------------------------------------------------
    def add_result(self, result_id: int, name: str, score: float, verdict: str, seconds: float,
                   thumbnail: np.ndarray | None = None) -> None:
        self.add_results([(result_id, name, score, verdict, seconds, thumbnail)])

    def add_results(self, rows: list[tuple[int, str, float, str, float, np.ndarray | None]]) -> None:
        """Append rows (result id, name, score, verdict, seconds, thumbnail), oldest first, as
        one change of the table: one repaint, one count, one scroll (live inspection adds
        results faster than a table should redraw)."""
        if not rows:
            return
        self.table.setUpdatesEnabled(False)
        try:
            for row_values in rows:
                self._append_row(*row_values)
            while self.table.rowCount() > MAX_ROWS:
                self.table.removeRow(0)
        finally:
            self.table.setUpdatesEnabled(True)
        self._update_shown()
        self.table.scrollToBottom()

    def _append_row(self, result_id: int, name: str, score: float, verdict: str, seconds: float,
                    thumbnail: np.ndarray | None) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        icon_item = QTableWidgetItem()
        if thumbnail is not None:
            icon_item.setIcon(thumbnail_icon(thumbnail, ICON))
        icon_item.setData(Qt.ItemDataRole.UserRole, result_id)
        name_item = QTableWidgetItem(name)
        name_item.setToolTip(name)
        score_item = QTableWidgetItem(f"{score:.3f}")
        score_item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        time_item = QTableWidgetItem(f"{seconds * 1000:.0f}")
        time_item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        items = [icon_item, name_item, score_item, QTableWidgetItem(verdict), time_item]
        for col, item in enumerate(items):
            self.table.setItem(row, col, item)
        self._paint_verdict(row, verdict)
        self._filter_row(row)

    def _paint_verdict(self, row: int, verdict: str, changed_from: str | None = None) -> None:
        item = self.table.item(row, 3)
        item.setText(verdict if not changed_from else f"{changed_from} → {verdict}")
        item.setToolTip("" if not changed_from
                        else f"was {changed_from} before the last change of the model (a label, its undo, a fit)")
        item.setBackground(QBrush(VERDICT_COLOURS.get(verdict, QColor(255, 255, 255))))
        item.setData(VERDICT_ROLE, verdict)
        item.setData(CHANGED_ROLE, changed_from or None)

    def set_verdicts(self, verdicts: dict[int, str], scores: dict[int, float] | None = None,
                     changed_from: dict[int, str] | None = None) -> None:
        """Re-paint verdicts (and scores, after a label re-judged them) by result id; a verdict
        a label flipped shows as "NG → OK". The filter is applied again afterwards."""
        changed_from = changed_from or {}
        for row in range(self.table.rowCount()):
            rid = self.table.item(row, 0).data(Qt.ItemDataRole.UserRole)
            if rid in verdicts:
                self._paint_verdict(row, verdicts[rid], changed_from.get(rid))
            if scores and rid in scores:
                self.table.item(row, 2).setText(f"{scores[rid]:.3f}")
        self.apply_filter()

    def keep_only(self, result_ids) -> None:
        """Remove the rows of results not in ``result_ids`` (those a new model could not score
        again left the session's table)."""
        for row in reversed(range(self.table.rowCount())):
            if self.table.item(row, 0).data(Qt.ItemDataRole.UserRole) not in result_ids:
                self.table.removeRow(row)
        self._update_shown()

    def clear(self) -> None:
        self.table.setRowCount(0)
        self._update_shown()

    def row_count(self) -> int:
        """All rows, shown or hidden by the filter."""
        return self.table.rowCount()

    # -- filter ----------------------------------------------------------------------------------
    def set_filter(self, mode: str | None = None, text: str | None = None) -> None:
        """Choose the filter: ``mode`` one of ``FILTERS`` ("All", "NG only", "Changed by a
        label"), ``text`` a case-insensitive part of the name; None leaves either as it is."""
        if mode is not None:
            if mode not in FILTERS:
                raise ValueError(f"unknown filter {mode!r}; expected one of {FILTERS}")
            self.filter_combo.setCurrentText(mode)
        if text is not None:
            self.name_filter.setText(text)
        self.apply_filter()

    def filter(self) -> tuple[str, str]:
        return self.filter_combo.currentText(), self.name_filter.text()

    def apply_filter(self) -> None:
        for row in range(self.table.rowCount()):
            self._filter_row(row)
        self._update_shown()

    def _matches(self, row: int) -> bool:
        mode, text = self.filter()
        verdict = self.table.item(row, 3)
        if mode == SHOW_NG and verdict.data(VERDICT_ROLE) != "NG":
            return False
        if mode == SHOW_CHANGED and not verdict.data(CHANGED_ROLE):
            return False
        return text.strip().lower() in self.table.item(row, 1).text().lower()

    def _filter_row(self, row: int) -> None:
        self.table.setRowHidden(row, not self._matches(row))

    def visible_rows(self) -> list[int]:
        return [r for r in range(self.table.rowCount()) if not self.table.isRowHidden(r)]

    def visible_count(self) -> int:
        return len(self.visible_rows())

    def _update_shown(self) -> None:
        total, shown = self.table.rowCount(), self.visible_count()
        self.shown_label.setText("" if shown == total else f"{shown} of {total}")

    # -- selection -------------------------------------------------------------------------------
    def selected_id(self) -> int | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return self.table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole)

    def select_row(self, row: int) -> None:
        if 0 <= row < self.table.rowCount():
            self.table.selectRow(row)

    def select_next(self) -> None:
        """Select the next visible row after the current one (the first when none is selected);
        stays on the last visible row at the end."""
        rows = self.table.selectionModel().selectedRows()
        current = rows[0].row() if rows else -1
        visible = self.visible_rows()
        after = [r for r in visible if r > current]
        if after:
            self.select_row(after[0])
        elif visible and (current < 0 or self.table.isRowHidden(current)):
            self.select_row(visible[-1])

    def _on_selection(self) -> None:
        rid = self.selected_id()
        if rid is not None:
            self.result_selected.emit(rid)
