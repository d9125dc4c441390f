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


def heat_lut(fade_in: bool = False) -> np.ndarray:
    """(256, 4) uint8 RGBA: entry 0 fully transparent, then yellow -> orange -> red, rising alpha.

    ``fade_in``: alpha rises from 0 instead of 120, for the full map, whose low end is the
    coolest part of the image rather than the pixel threshold."""
    t = np.linspace(0.0, 1.0, 256)
    lut = np.empty((256, 4), np.uint8)
    lut[:, 0] = 255
    lut[:, 1] = np.clip(230 * (1 - t), 0, 255).astype(np.uint8)
    lut[:, 2] = 0
    lut[:, 3] = np.clip(255 * t ** 1.5 if fade_in else 120 + 135 * t, 0, 255).astype(np.uint8)
    lut[0] = (0, 0, 0, 0)
    return lut


def image_fingerprint(rgb: np.ndarray) -> int:
    """Cheap identity of an image's pixels: a hash of its shape and a coarse (~32 x 32) sample."""
    h, w = rgb.shape[:2]
    sample = np.ascontiguousarray(rgb[:: max(1, h // 32), :: max(1, w // 32)])
    return hash((rgb.shape, sample.tobytes()))
