"""InspectionView: the part image, its anomaly heat map, region outlines and a big verdict.

Knows nothing about the detector: it is fed numpy arrays. The heat map keeps its own (S, S)
resolution and is stretched over the image rectangle with ``setRect``; values at or below the
pixel threshold map to the transparent LUT entry 0, so moving the threshold only changes levels.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QPainterPath, QPen, QColor
from PySide6.QtWidgets import QGraphicsPathItem, QHBoxLayout, QLabel, QSlider, QVBoxLayout, QWidget

from ..imaging import heat_lut

VERDICT_STYLE = {
    "OK": "background:#1b7a2e; color:white;",
    "NG": "background:#c0161c; color:white;",
    "?": "background:#666; color:white;",
    "": "background:#333; color:#aaa;",
}


class InspectionView(QWidget):
    pixel_clicked = Signal(int, int)  # row, col in anomaly-map coordinates

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._map_shape: tuple[int, int] | None = None
        self._image_shape: tuple[int, int] | None = None
        self._pixel_threshold = 0.0
        self._vmax: float | None = None

        self.verdict_label = QLabel("—")
        self.verdict_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.verdict_label.setMinimumHeight(90)
        self.detail_label = QLabel("No image inspected yet")
        self.detail_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.detail_label.setStyleSheet("font-size:16px;")

        self.graphics = pg.GraphicsLayoutWidget()
        self.viewbox = self.graphics.addViewBox()
        self.viewbox.setAspectLocked(True)
        self.viewbox.invertY(True)
        self.base = pg.ImageItem(axisOrder="row-major")
        self.heat = pg.ImageItem(axisOrder="row-major")
        self.heat.setLookupTable(heat_lut())
        self.heat.setZValue(10)
        self.heat.setOpacity(0.6)
        self.viewbox.addItem(self.base)
        self.viewbox.addItem(self.heat)
        self._outlines: list[QGraphicsPathItem] = []
        self._selected: QGraphicsPathItem | None = None
        self.graphics.scene().sigMouseClicked.connect(self._on_scene_clicked)

        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(60)
        self.opacity_slider.setToolTip("Heat-map opacity")
        self.opacity_slider.valueChanged.connect(lambda v: self.set_opacity(v / 100.0))

        bar = QHBoxLayout()
        bar.addWidget(QLabel("Overlay"))
        bar.addWidget(self.opacity_slider, 1)
        self.name_label = QLabel("")
        bar.addWidget(self.name_label, 2)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.verdict_label)
        lay.addWidget(self.detail_label)
        lay.addWidget(self.graphics, 1)
        lay.addLayout(bar)
        self.set_verdict("", None, None)

    # -- content --------------------------------------------------------------------------
    def set_image(self, rgb: np.ndarray, name: str = "") -> None:
        """(H, W, 3) uint8 RGB; resets the zoom when the image size changes."""
        shape = rgb.shape[:2]
        self.base.setImage(np.ascontiguousarray(rgb), levels=(0, 255))
        self.name_label.setText(name)
        if shape != self._image_shape:
            self._image_shape = shape
            self.viewbox.autoRange(padding=0.01)
        if self._map_shape is not None:
            self._place_heat()

    def set_anomaly_map(self, anomaly_map: np.ndarray | None) -> None:
        """(S, S) float32 map (None hides the overlay)."""
        if anomaly_map is None:
            self.heat.clear()
            self._map_shape = None
            return
        m = np.ascontiguousarray(anomaly_map, dtype=np.float32)
        self._map_shape = m.shape
        self.heat.setImage(m, autoLevels=False, levels=self._levels())
        self._place_heat()

    def _place_heat(self) -> None:
        if self._image_shape is None or self._map_shape is None:
            return
        h, w = self._image_shape
        self.heat.setRect(QRectF(0, 0, w, h))

    def _levels(self) -> tuple[float, float]:
        lo = self._pixel_threshold
        hi = self._vmax if self._vmax is not None and self._vmax > lo else lo * 2 if lo > 0 else lo + 1.0
        return lo, max(hi, lo + 1e-6)

    def set_pixel_threshold(self, value: float, vmax: float | None = None) -> None:
        self._pixel_threshold = float(value)
        if vmax is not None:
            self._vmax = float(vmax)
        self.heat.setLevels(self._levels())

    def set_opacity(self, alpha: float) -> None:
        self.heat.setOpacity(alpha)
        if self.opacity_slider.value() != round(alpha * 100):
            self.opacity_slider.blockSignals(True)
            self.opacity_slider.setValue(round(alpha * 100))
            self.opacity_slider.blockSignals(False)

    def _outline_item(self, contour: np.ndarray, pen: QPen, z: float) -> QGraphicsPathItem | None:
        if len(contour) < 2 or self._map_shape is None or self._image_shape is None:
            return None
        sx = self._image_shape[1] / self._map_shape[1]
        sy = self._image_shape[0] / self._map_shape[0]
        path = QPainterPath()
        pts = (np.asarray(contour, np.float64) + 0.5) * (sx, sy)  # pixel centres
        path.moveTo(QPointF(*pts[0]))
        for x, y in pts[1:]:
            path.lineTo(QPointF(x, y))
        path.closeSubpath()
        item = QGraphicsPathItem(path)
        item.setPen(pen)
        item.setZValue(z)
        self.viewbox.addItem(item)
        return item

    def set_regions(self, contours: list[np.ndarray]) -> None:
        """Region outlines: (N, 2) x, y points in map coordinates, drawn scaled to the image."""
        for item in self._outlines:
            self.viewbox.removeItem(item)
        self._outlines = []
        pen = QPen(QColor(0, 255, 255))
        pen.setWidth(2)
        pen.setCosmetic(True)
        for c in contours or []:
            item = self._outline_item(c, pen, 20)
            if item is not None:
                self._outlines.append(item)

    def set_selected_region(self, contour: np.ndarray | None) -> None:
        """Highlight the region picked for labelling (None clears it)."""
        if self._selected is not None:
            self.viewbox.removeItem(self._selected)
            self._selected = None
        if contour is not None:
            pen = QPen(QColor(255, 220, 0))
            pen.setWidth(4)
            pen.setCosmetic(True)
            pen.setStyle(Qt.PenStyle.DashLine)
            self._selected = self._outline_item(contour, pen, 30)

    @property
    def has_selected_region(self) -> bool:
        return self._selected is not None

    @property
    def outline_count(self) -> int:
        return len(self._outlines)

    def set_verdict(self, verdict: str, score: float | None, threshold: float | None) -> None:
        text = {"OK": "OK", "NG": "NG", "?": "NO THRESHOLD"}.get(verdict, "—")
        self.verdict_label.setText(text)
        self.verdict_label.setStyleSheet(
            VERDICT_STYLE.get(verdict, VERDICT_STYLE[""]) + "font-size:56px; font-weight:bold; border-radius:6px;"
        )
        if score is None:
            self.detail_label.setText("No image inspected yet")
        else:
            thr = "—" if threshold is None else f"{threshold:.2f}"
            self.detail_label.setText(f"score {score:.2f} / threshold {thr}")

    @property
    def verdict_text(self) -> str:
        return self.verdict_label.text()

    def clear(self) -> None:
        self.base.clear()
        self.set_anomaly_map(None)
        self.set_regions([])
        self.set_selected_region(None)
        self._image_shape = None
        self.name_label.setText("")
        self.set_verdict("", None, None)

    # -- clicks -----------------------------------------------------------------------------
    def map_pixel_at_scene(self, scene_pos: QPointF) -> tuple[int, int] | None:
        """(row, col) of the anomaly-map pixel under a scene position, or None outside."""
        if self._map_shape is None:
            return None
        p = self.heat.mapFromScene(scene_pos)
        col, row = int(np.floor(p.x())), int(np.floor(p.y()))
        if 0 <= row < self._map_shape[0] and 0 <= col < self._map_shape[1]:
            return row, col
        return None

    def _on_scene_clicked(self, ev) -> None:
        if ev.button() != Qt.MouseButton.LeftButton:
            return
        hit = self.map_pixel_at_scene(ev.scenePos())
        if hit is not None:
            self.pixel_clicked.emit(*hit)
