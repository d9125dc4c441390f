"""The error banner: floats over the top edge of the image area (below the verdict) instead
of taking a row of the layout. A banner pushed into the layout moved the image down by its
height, so an operator's next click landed somewhere else than aimed (found trying the
station); over the whole view it hid half of the big verdict."""
from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget


class ErrorBanner(QWidget):
    def __init__(self, host: QWidget) -> None:
        """``host``: the widget it floats over (kept as wide as it, at its top)."""
        super().__init__(host)
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)  # paint the pink behind all of it
        self.setStyleSheet("background:#ffd7d7;")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setStyleSheet("background:#ffd7d7; color:#800; padding:6px; font-weight:bold;")
        dismiss = QPushButton("Dismiss")
        dismiss.clicked.connect(self.hide)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 4, 0)
        row.addWidget(self.label, 1)
        row.addWidget(dismiss)
        host.installEventFilter(self)
        self.hide()

    def show_message(self, text: str) -> None:
        self.label.setText(text)
        self._place()
        self.show()
        self.raise_()

    def _place(self) -> None:
        host = self.parentWidget()
        width = host.width()
        self.setGeometry(0, 0, width, self.heightForWidth(width) if self.hasHeightForWidth()
                         else self.sizeHint().height())

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        if watched is self.parentWidget() and event.type() == QEvent.Type.Resize and self.isVisible():
            self._place()
        return False
