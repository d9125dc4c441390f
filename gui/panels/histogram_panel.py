"""HistogramPanel: OK calibration scores vs inspected scores, with a draggable threshold line.

Each series is normalised to the share of its own images per bin, so 40 calibration images
stay visible next to thousands of inspected ones; the legend gives the counts. The legend sits
in the top-right corner above the bars, and the threshold label is kept inside the plot: it
points towards the middle of the view and drops below the legend when the two would overlap.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout, QWidget
from PySide6.QtCore import QRectF, Signal

OK_BRUSH = (40, 170, 70, 150)
INSPECTED_BRUSH = (60, 120, 230, 150)
LINE_COLOUR = (200, 0, 0)
BINS = 40
MARGIN = 0.05  # of the score span, each side of the scores and the threshold
LABEL_TOP = 0.97  # relative height of the threshold label when nothing is in the way


class HistogramPanel(QWidget):
    threshold_moved = Signal(float)  # the operator dragged the line

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plot = pg.PlotWidget()
        self.plot.setBackground("w")
        self.plot.setLabel("bottom", "image score")
        self.plot.setLabel("left", "share of images")
        for side in ("left", "bottom"):
            axis = self.plot.getAxis(side)
            axis.enableAutoSIPrefix(False)  # a share is 0..1, never "x0.001"
            axis.setTextPen(pg.mkPen(60, 60, 60))
        self.plot.getViewBox().setMouseEnabled(x=True, y=False)
        self.legend = self.plot.addLegend(offset=(-6, 6), brush=pg.mkBrush(255, 255, 255, 220),
                                          pen=pg.mkPen(150, 150, 150), labelTextColor=(20, 20, 20),
                                          labelTextSize="9pt")
        self.legend.setZValue(100)  # above the bars
        self.ok_curve = self.plot.plot([0, 1], [0], stepMode="center", fillLevel=0, brush=OK_BRUSH,
                                       pen=pg.mkPen(OK_BRUSH[:3]), name="OK calibration")
        self.inspected_curve = self.plot.plot([0, 1], [0], stepMode="center", fillLevel=0,
                                              brush=INSPECTED_BRUSH, pen=pg.mkPen(INSPECTED_BRUSH[:3]),
                                              name="inspected")
        self.line = pg.InfiniteLine(angle=90, movable=True, pen=pg.mkPen(LINE_COLOUR, width=3),
                                    label="threshold {value:.2f}",
                                    labelOpts={"position": LABEL_TOP, "color": LINE_COLOUR,
                                               "fill": pg.mkBrush(255, 255, 255, 200),
                                               "anchors": [(0, 0), (0, 0)]})
        self.line.setZValue(50)
        self._has_threshold = False
        self.line.setVisible(False)  # until there is a threshold (set_threshold)
        self.label = self.line.label
        self.plot.addItem(self.line)
        self.line.sigPositionChanged.connect(self._on_line_moved)
        self.plot.getViewBox().sigRangeChanged.connect(lambda *_: self._place_label())
        self.plot.getViewBox().sigResized.connect(lambda *_: self._place_label())
        self._ok = np.zeros(0)
        self._inspected = np.zeros(0)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.plot)
        self.setMinimumHeight(160)
        self._update_legend()

    # -- data ----------------------------------------------------------------------------------
    def set_scores(self, ok_scores: np.ndarray | None = None, inspected: np.ndarray | None = None) -> None:
        """Replace either series (None keeps it); each is drawn as its share of images per bin."""
        if ok_scores is not None:
            self._ok = _finite(ok_scores)
        if inspected is not None:
            self._inspected = _finite(inspected)
        both = np.concatenate([self._ok, self._inspected])
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, BINS + 1)
        top = 0.0
        for curve, data in ((self.ok_curve, self._ok), (self.inspected_curve, self._inspected)):
            counts, _ = np.histogram(data, bins=edges)
            share = counts / data.size if data.size else counts.astype(np.float64)
            curve.setData(edges, share)
            top = max(top, float(share.max()) if share.size else 0.0)
        self.plot.setYRange(0, (top or 1.0) * 1.15, padding=0)  # room above the bars for the label
        self._update_legend()
        self._fit_x_range()

    def counts(self) -> tuple[int, int]:
        """Number of (calibration, inspected) scores shown."""
        return int(self._ok.size), int(self._inspected.size)

    def _update_legend(self) -> None:
        names = {self.ok_curve: f"OK calibration ({self._ok.size})",
                 self.inspected_curve: f"inspected ({self._inspected.size})"}
        for sample, label in self.legend.items:
            if sample.item in names:
                label.setText(names[sample.item])

    def _fit_x_range(self) -> None:
        """Cover every score and the threshold, with a margin on both sides."""
        line = [self.line.value()] if self._has_threshold else []
        values = np.concatenate([self._ok, self._inspected, _finite(line)])
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        pad = (hi - lo) * MARGIN if hi > lo else max(abs(hi) * MARGIN, 0.5)
        self.plot.setXRange(lo - pad, hi + pad, padding=0)

    # -- threshold ------------------------------------------------------------------------------
    def set_threshold(self, value: float | None) -> None:
        """Move the line without emitting ``threshold_moved``; widens the x range if needed.
        None: no threshold yet (no model, or one fitted without held-out parts): no line."""
        self._has_threshold = value is not None
        self.line.setVisible(self._has_threshold)
        if value is None:
            return
        self.line.blockSignals(True)
        self.line.setValue(value)
        self.line.blockSignals(False)
        self.label.valueChanged()  # the text shows the value; the blocked signal did not tell it
        (x0, x1), _ = self.plot.getViewBox().viewRange()
        if not x0 <= value <= x1:
            self._fit_x_range()
        self._place_label()

    def threshold(self) -> float:
        return float(self.line.value())

    def _on_line_moved(self) -> None:
        self._place_label()
        self.threshold_moved.emit(self.threshold())

    def _place_label(self) -> None:
        """At the top, on the inner side of the line (towards the middle of the view); on the
        other side if the legend is in the way and that side has room; else below the legend.

        Computed from the view range rather than item transforms, which update lazily."""
        vb = self.plot.getViewBox()
        (x0, x1), _ = vb.viewRange()
        frac = (self.line.value() - x0) / (x1 - x0) if x1 > x0 else 0.0
        inner = (1, 0) if frac > 0.5 else (0, 0)
        anchor, position = inner, LABEL_TOP
        width, height = vb.width(), vb.height()
        if height > 0 and self.legend.isVisible():
            text = self.label.boundingRect()
            x, top = frac * width, (1.0 - LABEL_TOP) * height
            legend = self.legend.mapRectToItem(vb, self.legend.boundingRect())

            def rect(a):
                return QRectF(x - text.width() if a[0] else x, top, text.width(), text.height())

            outer = (0, 0) if inner[0] else (1, 0)
            if rect(inner).intersects(legend):
                r = rect(outer)
                if r.left() >= 0 and r.right() <= width and not r.intersects(legend):
                    anchor = outer
                else:
                    position = max(0.05, 1.0 - (legend.bottom() + 4) / height)
        self.label.anchors = [anchor, anchor]
        self.label.setAnchor(anchor)
        self.label.setPosition(position)

    def label_rect(self):
        """The threshold label's rectangle in view-box pixels (for checks and tests)."""
        vb = self.plot.getViewBox()
        return self.label.mapRectToItem(vb, self.label.boundingRect())


def _finite(values) -> np.ndarray:
    a = np.asarray(values, np.float64).ravel()
    return a[np.isfinite(a)]
