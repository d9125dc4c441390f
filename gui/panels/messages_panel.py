"""MessagesPanel: every status and error message of this session, with its time, newest last.

The status line shows one message for a few seconds and cuts a long one at the window's edge,
and the error banner shows only the latest error: found trying the station, an operator who
looked up after a run of parts could not find what an earlier message had said (a recovery
note covered by a later error, a fit's note about one held-out part cut off). Here every
message stays whole until the window closes (the last ``KEEP`` of them).
"""
from __future__ import annotations

import html
import time
from collections import deque

from PySide6.QtWidgets import QHBoxLayout, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget


class MessagesPanel(QWidget):
    #: messages kept; older ones drop off the top
    KEEP = 2000

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setMaximumBlockCount(self.KEEP)
        self.text.setPlaceholderText("Status messages and errors of this session appear here, with their time.")
        self.clear_button = QPushButton("Clear")
        self.clear_button.clicked.connect(self.clear)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.clear_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.text, 1)
        lay.addLayout(row)
        self._kept: deque[str] = deque(maxlen=self.KEEP)  # the same, as plain text
        self.unseen_errors = 0  # errors added while the panel was out of sight (the dock's title says so)

    def add(self, message: str, error: bool = False) -> None:
        stamp = time.strftime("%H:%M:%S")
        body = html.escape(message).replace("\n", "<br>")
        if error:
            line = f'<span style="color:#a00; font-weight:bold;">{stamp}  Error: {body}</span>'
            if self.visibleRegion().isEmpty():  # behind another tab (isVisible() is true there too)
                self.unseen_errors += 1
        else:
            line = f"<span>{stamp}  {body}</span>"
        self.text.appendHtml(line)
        self._kept.append(f"{stamp}  {'Error: ' if error else ''}{message}")
        bar = self.text.verticalScrollBar()
        bar.setValue(bar.maximum())

    def messages(self) -> list[str]:
        """The kept messages as plain text with their time, oldest first."""
        return list(self._kept)

    def seen(self) -> None:
        self.unseen_errors = 0

    def clear(self) -> None:
        self.text.clear()
        self._kept.clear()
        self.unseen_errors = 0
