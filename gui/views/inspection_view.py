"""InspectionView: the part image, its anomaly heat map, region outlines and a big verdict.

Knows nothing about the detector: it is fed numpy arrays. The heat map keeps its own (S, S)
resolution and is stretched over the image rectangle with ``setRect``; values at or below the
pixel threshold map to the transparent LUT entry 0, so moving the threshold only changes levels.
With "Full heat map" ticked the levels run from the map's minimum instead, so the whole map
shows (an NG by image score can have no pixel above the pixel threshold).

A new image resets the zoom to the whole image unless "Keep zoom" is ticked; re-showing the
same image (a threshold moved) never does.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPainterPath, QPen
from PySide6.QtWidgets import (QCheckBox, QGraphicsPathItem, QHBoxLayout, QLabel, QSizePolicy, QSlider,
                               QVBoxLayout, QWidget)

from ..imaging import heat_lut, image_fingerprint

VERDICT_STYLE = {
    "OK": "background:#1b7a2e; color:white;",
    "NG": "background:#c0161c; color:white;",
    "?": "background:#666; color:white;",
    "": "background:#333; color:#aaa;",
}
VERDICT_FONT = "font-size:104px; font-weight:bold; border-radius:8px; padding:0px;"
LONG_VERDICT_FONT = "font-size:48px; font-weight:bold; border-radius:8px;"
NOTE_STYLE = "background:#fff3cd; color:#5c4400; border:1px solid #e0c060; padding:4px; font-size:15px;"


class _ElidedLabel(QLabel):
    """One line of text elided in the middle to the width it gets; the full text in the tooltip."""

    def __init__(self) -> None:
        super().__init__()
        self._full = ""
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)

    def set_full_text(self, text: str) -> None:
        self._full = text
        self.setToolTip(text)
        self._elide()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        self.setText(self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideMiddle, max(self.width(), 40)))


class InspectionView(QWidget):
    pixel_clicked = Signal(int, int)  # row, col in anomaly-map coordinates
    full_heatmap_toggled = Signal(bool)  # the operator ticked/unticked "Full heat map"

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._map_shape: tuple[int, int] | None = None
        self._map_range: tuple[float, float] | None = None  # min, max of the shown map
        self._image_shape: tuple[int, int] | None = None
        self._image_key: object = None
        self._pixel_threshold = 0.0
        self._vmax: float | None = None

        self.verdict_label = QLabel("—")
        self.verdict_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.verdict_label.setMinimumHeight(128)
        self.detail_label = QLabel("No image inspected yet")
        self.detail_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.detail_label.setStyleSheet("font-size:20px;")
        self.note_label = QLabel("")
        self.note_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.note_label.setWordWrap(True)
        self.note_label.setStyleSheet(NOTE_STYLE)
        self.note_label.hide()

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
        self.opacity_slider.setFixedWidth(140)
        self.opacity_slider.setToolTip("Heat-map opacity")
        self.opacity_slider.valueChanged.connect(lambda v: self.set_opacity(v / 100.0))
        self.full_heat_check = QCheckBox("Full heat map")
        self.full_heat_check.setToolTip("Colour the whole anomaly map, not only pixels above the pixel threshold")
        self.full_heat_check.toggled.connect(self._on_full_heat_toggled)
        self.keep_zoom_check = QCheckBox("Keep zoom")
        self.keep_zoom_check.setToolTip("Keep the zoom for the next image (otherwise it shows the whole image)")
        self.name_label = _ElidedLabel()

        bar = QHBoxLayout()
        bar.setContentsMargins(4, 2, 4, 2)
        bar.setSpacing(10)
        bar.addWidget(QLabel("Overlay"))
        bar.addWidget(self.opacity_slider)
        bar.addWidget(self.full_heat_check)
        bar.addWidget(self.keep_zoom_check)
        bar.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        lay.addWidget(self.verdict_label)
        lay.addWidget(self.detail_label)
        lay.addWidget(self.note_label)
        lay.addWidget(self.graphics, 1)
        # the image's name on a line of its own: beside the overlay controls it had ~60 px at
        # a 1500 px wide window, and "cell....png" names no part
        lay.addWidget(self.name_label)
        lay.addLayout(bar)
        self.set_verdict("", None, None)

    # -- content --------------------------------------------------------------------------
    def set_image(self, rgb: np.ndarray, name: str = "", key: object = None) -> None:
        """(H, W, 3) uint8 RGB. A new image (another ``key``, e.g. the result id; without a key,
        another name or other pixels) resets the zoom to the whole image unless "Keep zoom" is
        ticked; a new image size always does. Showing the same image again keeps the zoom."""
        rgb = np.ascontiguousarray(rgb)
        shape = rgb.shape[:2]
        key = (name, image_fingerprint(rgb)) if key is None else key
        self.base.setImage(rgb, levels=(0, 255))
        self.name_label.set_full_text(name)
        new_image = key != self._image_key
        if shape != self._image_shape or (new_image and not self.keep_zoom_check.isChecked()):
            self.viewbox.autoRange(padding=0.01)
        self._image_shape, self._image_key = shape, key
        if self._map_shape is not None:
            self._place_heat()

    def set_anomaly_map(self, anomaly_map: np.ndarray | None) -> None:
        """(S, S) float32 map (None hides the overlay)."""
        if anomaly_map is None:
            self.heat.clear()
            self._map_shape = self._map_range = None
            return
        m = np.ascontiguousarray(anomaly_map, dtype=np.float32)
        self._map_shape = m.shape
        finite = m[np.isfinite(m)]
        self._map_range = (float(finite.min()), float(finite.max())) if finite.size else None
        self.heat.setImage(m, autoLevels=False, levels=self._levels())
        self._place_heat()

    def _place_heat(self) -> None:
        if self._image_shape is None or self._map_shape is None:
            return
        h, w = self._image_shape
        self.heat.setRect(QRectF(0, 0, w, h))

    def _levels(self) -> tuple[float, float]:
        if self.full_heatmap and self._map_range is not None:
            lo, top = self._map_range  # the whole map: its minimum up to vmax (or its maximum)
            hi = self._vmax if self._vmax is not None and self._vmax > lo else top
            return lo, max(hi, lo + 1e-6)
        lo = self._pixel_threshold
        hi = self._vmax if self._vmax is not None and self._vmax > lo else lo * 2 if lo > 0 else lo + 1.0
        return lo, max(hi, lo + 1e-6)

    def set_pixel_threshold(self, value: float, vmax: float | None = None) -> None:
        self._pixel_threshold = float(value)
        if vmax is not None:
            self._vmax = float(vmax)
        self.heat.setLevels(self._levels())

    @property
    def full_heatmap(self) -> bool:
        return self.full_heat_check.isChecked()

    def set_full_heatmap(self, on: bool) -> None:
        """Tick/untick "Full heat map" (emits ``full_heatmap_toggled`` when it changes)."""
        self.full_heat_check.setChecked(on)

    def _on_full_heat_toggled(self, on: bool) -> None:
        self.heat.setLookupTable(heat_lut(fade_in=on))
        self.heat.setLevels(self._levels())
        self.full_heatmap_toggled.emit(on)

    @property
    def keep_zoom(self) -> bool:
        return self.keep_zoom_check.isChecked()

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
        font = VERDICT_FONT if len(text) <= 2 else LONG_VERDICT_FONT
        self.verdict_label.setStyleSheet(VERDICT_STYLE.get(verdict, VERDICT_STYLE[""]) + font)
        if score is None:
            self.detail_label.setText("No image inspected yet")
        else:
            thr = "—" if threshold is None else f"{threshold:.2f}"
            self.detail_label.setText(f"score {score:.2f} / threshold {thr}")

    @property
    def verdict_text(self) -> str:
        return self.verdict_label.text()

    def set_note(self, text: str) -> None:
        """A short line under the verdict detail, e.g. why an NG shows no heat; "" hides it.
        The caller decides when; it stays until replaced, ``set_note("")``, ``clear()`` or
        ``show_waiting()``."""
        self.note_label.setText(text)
        self.note_label.setVisible(bool(text))

    @property
    def note_text(self) -> str:
        return self.note_label.text()

    def clear(self) -> None:
        self.base.clear()
        self.set_anomaly_map(None)
        self.set_regions([])
        self.set_selected_region(None)
        self._image_shape = None
        self._image_key = None
        self.name_label.set_full_text("")
        self.set_note("")
        self.set_verdict("", None, None)

    @property
    def shown_key(self) -> object:
        """The key of the image shown (set_image's ``key``: the result id), None when empty."""
        return self._image_key

    def show_waiting(self, text: str) -> None:
        """Nothing to judge yet (live just started): no image, map or outlines, a neutral "—"
        verdict and ``text`` in place of the score line."""
        self.clear()
        self.detail_label.setText(text)

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

