"""HistogramPanel: OK calibration scores vs inspected scores, with a draggable threshold line."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QVBoxLayout, QWidget

OK_BRUSH = (40, 170, 70, 150)
INSPECTED_BRUSH = (60, 120, 230, 150)


class HistogramPanel(QWidget):
    threshold_moved = Signal(float)  # the operator dragged the line

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plot = pg.PlotWidget()
        self.plot.setBackground("w")
        self.plot.setLabel("bottom", "image score")
        self.plot.setLabel("left", "images")
        self.plot.addLegend(offset=(5, 5))
        self.ok_curve = self.plot.plot([0, 1], [0], stepMode="center", fillLevel=0, brush=OK_BRUSH,
                                       pen=pg.mkPen(OK_BRUSH[:3]), name="OK calibration")
        self.inspected_curve = self.plot.plot([0, 1], [0], stepMode="center", fillLevel=0,
                                              brush=INSPECTED_BRUSH, pen=pg.mkPen(INSPECTED_BRUSH[:3]),
                                              name="inspected")
        self.line = pg.InfiniteLine(angle=90, movable=True, pen=pg.mkPen((200, 0, 0), width=3),
                                    label="threshold", labelOpts={"position": 0.9, "color": (200, 0, 0)})
        self.plot.addItem(self.line)
        self.line.sigPositionChanged.connect(self._on_line_moved)
        self._ok = np.zeros(0)
        self._inspected = np.zeros(0)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.plot)
        self.setMinimumHeight(160)

    def set_scores(self, ok_scores: np.ndarray | None = None, inspected: np.ndarray | None = None) -> None:
        if ok_scores is not None:
            self._ok = np.asarray(ok_scores, np.float64)
        if inspected is not None:
            self._inspected = np.asarray(inspected, np.float64)
        both = np.concatenate([self._ok, self._inspected, [self.line.value()]])
        both = both[np.isfinite(both)]
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, 41)
        top = 1
        for curve, data in ((self.ok_curve, self._ok), (self.inspected_curve, self._inspected)):
            counts, _ = np.histogram(data, bins=edges)
            curve.setData(edges, counts)
            top = max(top, int(counts.max()) if counts.size else 0)
        self.plot.setYRange(0, top * 1.1, padding=0)  # no negative counts on an empty plot

    def set_threshold(self, value: float) -> None:
        """Move the line without emitting ``threshold_moved``."""
        self.line.blockSignals(True)
        self.line.setValue(value)
        self.line.blockSignals(False)

    def threshold(self) -> float:
        return float(self.line.value())

    def _on_line_moved(self) -> None:
        self.threshold_moved.emit(self.threshold())
