"""Small Qt image helpers: numpy RGB -> QImage/QIcon, and the heat-map lookup table."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QIcon, QImage, QImageReader, QPixmap


def to_qimage(rgb: np.ndarray) -> QImage:
    """(H, W, 3) uint8 RGB -> QImage (a copy, safe to keep)."""
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    return QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


def thumbnail_icon(rgb: np.ndarray, size: int = 64) -> QIcon:
    h, w = rgb.shape[:2]
    step = max(1, min(h, w) // (2 * size))  # cheap decimation before smooth scaling
    img = to_qimage(rgb[::step, ::step])
    pix = QPixmap.fromImage(img).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                        Qt.TransformationMode.SmoothTransformation)
    return QIcon(pix)


def file_thumbnail(path: str, size: int = 64) -> QIcon | None:
    """Thumbnail decoded at reduced size by Qt; None if Qt cannot read the file."""
    reader = QImageReader(path)
    reader.setAutoTransform(True)
    s = reader.size()
    if s.isValid() and s.width() > 0:
        s.scale(QSize(size, size), Qt.AspectRatioMode.KeepAspectRatio)
        reader.setScaledSize(s)
    img = reader.read()
    if img.isNull():
        return None
    return QIcon(QPixmap.fromImage(img))


def heat_lut() -> np.ndarray:
    """(256, 4) uint8 RGBA: entry 0 fully transparent, then yellow -> orange -> red, rising alpha."""
    t = np.linspace(0.0, 1.0, 256)
    lut = np.empty((256, 4), np.uint8)
    lut[:, 0] = 255
    lut[:, 1] = np.clip(230 * (1 - t), 0, 255).astype(np.uint8)
    lut[:, 2] = 0
    lut[:, 3] = np.clip(120 + 135 * t, 0, 255).astype(np.uint8)
    lut[0] = (0, 0, 0, 0)
    return lut
