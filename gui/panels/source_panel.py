"""SourcePanel: what to inspect — files, a folder, the demo stream, or a live source."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QGridLayout, QGroupBox, QHBoxLayout, QLineEdit,
                               QPushButton, QVBoxLayout, QWidget)

from .ok_set_panel import IMAGE_FILTER

LIVE_KINDS = [("camera", "Camera (device index)"), ("video", "Video file"), ("folder", "Watch folder")]


class SourcePanel(QWidget):
    inspect_files_requested = Signal(list)
    inspect_folder_requested = Signal(str)
    demo_stream_requested = Signal()
    live_requested = Signal(str, str)  # kind ("camera" | "video" | "folder"), target
    stop_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.files_button = QPushButton("Inspect images…  (Ctrl+O)")
        self.folder_button = QPushButton("Inspect folder…")
        self.demo_button = QPushButton("Inspect demo stream")
        self.demo_button.setVisible(False)
        self.files_button.clicked.connect(self.ask_files)
        self.folder_button.clicked.connect(self._ask_folder)
        self.demo_button.clicked.connect(self.demo_stream_requested)

        self.kind_combo = QComboBox()
        for key, label in LIVE_KINDS:
            self.kind_combo.addItem(label, key)
        self.target_edit = QLineEdit("0")
        self.browse_button = QPushButton("…")
        self.browse_button.setFixedWidth(30)
        self.browse_button.clicked.connect(self._browse_target)
        self.kind_combo.currentIndexChanged.connect(self._on_kind_changed)
        self.live_button = QPushButton("Start live  (F6)")
        self.live_button.setCheckable(True)
        self.live_button.clicked.connect(self._on_live_clicked)

        live_box = QGroupBox("Live")
        grid = QGridLayout(live_box)
        grid.addWidget(self.kind_combo, 0, 0, 1, 2)
        grid.addWidget(self.target_edit, 1, 0)
        grid.addWidget(self.browse_button, 1, 1)
        grid.addWidget(self.live_button, 2, 0, 1, 2)
        row = QHBoxLayout()
        row.addWidget(self.files_button)
        row.addWidget(self.folder_button)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.demo_button)
        lay.addWidget(live_box)
        lay.addStretch(1)

    def live_kind(self) -> str:
        return self.kind_combo.currentData()

    def set_live_target(self, kind: str, target: str) -> None:
        self.kind_combo.setCurrentIndex([k for k, _ in LIVE_KINDS].index(kind))
        self.target_edit.setText(target)

    def set_live(self, running: bool) -> None:
        self.live_button.setChecked(running)
        self.live_button.setText("Stop live  (Space)" if running else "Start live  (F6)")
        # while live, the source cannot change, and Space must stop live, not type into the field
        self.kind_combo.setEnabled(not running)
        self.target_edit.setEnabled(not running)

    def request_live_toggle(self) -> None:
        self.live_button.click()

    def _on_live_clicked(self, checked: bool) -> None:
        self.live_button.setChecked(not checked)  # the controller decides the real state
        if checked:
            self.live_requested.emit(self.live_kind(), self.target_edit.text().strip())
        else:
            self.stop_requested.emit()

    def _on_kind_changed(self) -> None:
        kind = self.live_kind()
        self.target_edit.setPlaceholderText({"camera": "0", "video": "video file", "folder": "folder"}[kind])
        if kind == "camera" and not self.target_edit.text().strip().isdigit():
            self.target_edit.setText("0")
        elif kind != "camera" and self.target_edit.text().strip().isdigit():
            self.target_edit.clear()
        self.browse_button.setEnabled(kind != "camera")

    def _browse_target(self) -> None:
        if self.live_kind() == "video":
            path, _ = QFileDialog.getOpenFileName(self, "Video file", "", "Videos (*.mp4 *.avi *.mkv *.mov);;All (*)")
        else:
            path = QFileDialog.getExistingDirectory(self, "Folder to watch")
        if path:
            self.target_edit.setText(path)

    def ask_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Inspect images", "", IMAGE_FILTER)
        if files:
            self.inspect_files_requested.emit(files)

    def _ask_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Inspect a folder")
        if folder:
            self.inspect_folder_requested.emit(folder)
