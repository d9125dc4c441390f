"""ThresholdPanel: image-score and pixel thresholds, each a slider + spin box kept in sync.

Moving either control emits ``thresholds_changed(image, pixel)`` once; the controller re-judges
stored results from their maps, it never re-runs the model.

A value set from outside (``set_values``, ``configure``) is never clamped: when it lies outside a
row's range the range grows to hold it, so the spin box shows the value the station judges at
and the slider handle stands where that value belongs.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QDoubleSpinBox, QGridLayout, QGroupBox, QLabel, QSlider, QWidget

STEPS = 1000
HEADROOM = 1.25  # a range grown to hold a value ends this far beyond it
WARNING_STYLE = "color:#b35900; font-weight:bold;"

#: ``fn(threshold) -> text`` or ``fn(threshold) -> (text, is_warning)``
FarDescriber = Callable[[float], "str | tuple[str, bool]"]


@contextmanager
def signals_blocked(*widgets):
    previous = [w.blockSignals(True) for w in widgets]
    try:
        yield
    finally:
        for w, p in zip(widgets, previous):
            w.blockSignals(p)


class _ThresholdRow:
    """One slider + spin box pair mapping [lo, hi] to integer slider steps.

    The row keeps the exact value it was given: the spin box shows it rounded to its decimals
    (more decimals for a small range), but ``value()`` returns it unrounded until the operator
    moves this row's slider or edits its spin box."""

    def __init__(self, on_change) -> None:
        self.lo, self.hi = 0.0, 10.0
        self._value = 0.0
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, STEPS)
        self.spin = QDoubleSpinBox()
        self.spin.setDecimals(3)
        self.spin.setKeyboardTracking(False)
        self._on_change = on_change
        self.slider.valueChanged.connect(self._from_slider)
        self.spin.valueChanged.connect(self._from_spin)
        self.set_range(0.0, 10.0)

    def set_range(self, lo: float, hi: float) -> None:
        self.lo, self.hi = float(lo), float(max(hi, lo + 1e-6))
        span = self.hi - self.lo
        with signals_blocked(self.spin, self.slider):
            self.spin.setDecimals(int(np.clip(4 - np.floor(np.log10(span)), 3, 8)))
            self.spin.setRange(self.lo, self.hi)
            self.spin.setSingleStep(span / 200)
            self.spin.setValue(self._value)
            self._sync_slider(self._value)

    def covers(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def _grow_to(self, value: float) -> None:
        if value > self.hi:
            self.set_range(self.lo, value * HEADROOM if value > 0 else value + 1.0)
        elif value < self.lo:
            self.set_range(value * HEADROOM if value < 0 else 0.0, self.hi)

    def _sync_slider(self, value: float) -> None:
        self.slider.setValue(round((value - self.lo) / (self.hi - self.lo) * STEPS))

    def value(self) -> float:
        return self._value

    def set_value(self, value: float) -> None:
        """Show ``value`` without emitting; grows the range when the value lies outside it."""
        value = float(value)
        if not np.isfinite(value):
            return
        self._value = value
        self._grow_to(value)
        with signals_blocked(self.spin, self.slider):
            self.spin.setValue(value)
            self._sync_slider(value)

    def _from_slider(self, step: int) -> None:
        self._value = self.lo + (self.hi - self.lo) * step / STEPS
        with signals_blocked(self.spin):
            self.spin.setValue(self._value)
        self._on_change()

    def _from_spin(self, value: float) -> None:
        self._value = float(value)
        with signals_blocked(self.slider):
            self._sync_slider(value)
        self._on_change()


class ThresholdPanel(QGroupBox):
    thresholds_changed = Signal(float, float)  # image threshold, pixel threshold

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Thresholds", parent)
        self._calibration = np.zeros(0)
        self._describer: FarDescriber | None = None
        self._configured = False
        self.image_row = _ThresholdRow(self._changed)
        self.pixel_row = _ThresholdRow(self._changed)
        self.far_label = QLabel("Expected false alarms: — (fit a model)")
        self.far_label.setWordWrap(True)
        self.far_label.setTextFormat(Qt.TextFormat.PlainText)
        self.far_warning = False
        grid = QGridLayout(self)
        grid.setVerticalSpacing(4)
        grid.addWidget(QLabel("Image score (OK/NG)"), 0, 0)
        grid.addWidget(self.image_row.slider, 0, 1)
        grid.addWidget(self.image_row.spin, 0, 2)
        grid.addWidget(QLabel("Pixel (heat map)"), 1, 0)
        grid.addWidget(self.pixel_row.slider, 1, 1)
        grid.addWidget(self.pixel_row.spin, 1, 2)
        grid.addWidget(self.far_label, 2, 0, 1, 3)
        grid.setColumnStretch(1, 1)
        self.setEnabled(False)

    def configure(self, image: float, pixel: float, image_range: tuple[float, float],
                  pixel_range: tuple[float, float], calibration_scores: np.ndarray | None = None,
                  keep_range: bool = True) -> None:
        """Set ranges and values without emitting ``thresholds_changed``.

        On a later call (a refit after a label) a row keeps its current range while its value
        still fits and the requested range has the same scale (top within a factor of 2), so the
        slider handle does not jump when the value did not change. ``keep_range=False`` always
        takes the requested ranges.
        """
        self._calibration = np.asarray(calibration_scores if calibration_scores is not None else [], np.float64)
        for row, value, (lo, hi) in ((self.image_row, image, image_range), (self.pixel_row, pixel, pixel_range)):
            same_scale = self._configured and row.hi / 2 <= hi <= row.hi * 2 and row.covers(value)
            if not (keep_range and same_scale):
                row.set_range(lo, hi)
        self._configured = True
        self.set_values(image, pixel)
        self.setEnabled(True)

    def set_values(self, image: float, pixel: float) -> None:
        """Show both thresholds (no signal); a value beyond a row's range grows the range."""
        self.image_row.set_value(image)
        self.pixel_row.set_value(pixel)
        self._update_far()

    def values(self) -> tuple[float, float]:
        return self.image_row.value(), self.pixel_row.value()

    def set_far_describer(self, fn: FarDescriber | None) -> None:
        """Let the caller write the expected-false-alarm line.

        ``fn(threshold: float)`` returns either the full text (``str``) or ``(text, is_warning)``;
        with ``is_warning`` true the line is shown in orange. It is called with the image
        threshold whenever that changes. ``None`` restores the built-in text (the fraction of
        calibration scores above the threshold).
        """
        self._describer = fn
        self._update_far()

    def expected_false_alarm_rate(self) -> float | None:
        if self._calibration.size == 0:
            return None
        return float((self._calibration > self.image_row.value()).mean())

    def _default_far_text(self) -> str:
        far = self.expected_false_alarm_rate()
        if far is None:
            return "Expected false alarms: unknown (no calibration images)"
        return f"Expected false alarms: {far:.1%} of OK parts ({self._calibration.size} calibration images)"

    def _update_far(self) -> None:
        warning = False
        if self._describer is None:
            text = self._default_far_text()
        else:
            out = self._describer(self.image_row.value())
            text, warning = (out, False) if isinstance(out, str) else (str(out[0]), bool(out[1]))
        self.far_warning = warning
        self.far_label.setText(text)
        self.far_label.setStyleSheet(WARNING_STYLE if warning else "")
        self._fit_far_label()

    def _fit_far_label(self) -> None:
        """Reserve the height the wrapped text needs at the label's width (a dock may be short)."""
        width = self.far_label.width()
        if width > 10:
            self.far_label.setMinimumHeight(self.far_label.heightForWidth(width))

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._fit_far_label()

    def _changed(self) -> None:
        self._update_far()
        self.thresholds_changed.emit(*self.values())
