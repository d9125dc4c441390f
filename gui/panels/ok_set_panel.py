"""OkSetPanel: the OK images a model is fitted on (thumbnails, count, add/remove) and the Fit job."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QIcon, QPainter, QPen, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QFileDialog, QHBoxLayout, QLabel, QListView, QListWidget,
    QListWidgetItem, QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from ..imaging import file_thumbnail

IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.tif *.tiff *.webp *.pgm *.ppm)"
THUMBS_PER_TICK = 8


def _blank_icon() -> QIcon:
    """A grey tile: a thumbnail not drawn yet."""
    placeholder = QPixmap(56, 56)
    placeholder.fill(QColor(225, 225, 225))
    return QIcon(placeholder)


def _unreadable_icon() -> QIcon:
    """A grey tile with a red cross: an OK image the last fit could not read."""
    pixmap = QPixmap(56, 56)
    pixmap.fill(QColor(235, 235, 235))
    painter = QPainter(pixmap)
    painter.setPen(QPen(QColor(190, 0, 0), 5))
    painter.drawLine(12, 12, 44, 44)
    painter.drawLine(44, 12, 12, 44)
    painter.end()
    return QIcon(pixmap)


class OkSetPanel(QWidget):
    add_requested = Signal(list)  # files and/or folders, not yet expanded
    remove_requested = Signal(list)  # paths
    fit_requested = Signal()
    capture_requested = Signal(int)  # number of frames to grab from the live source
    cancel_requested = Signal()
    model_chosen = Signal(str)  # normality model name for the next fit
    tiling_chosen = Signal(object)  # the next fit's tile setting: None, "auto" or pixels
    neighbourhood_chosen = Signal(int)  # the next fit's patch features: 1 (own patch) or n x n averaged
    pooling_chosen = Signal(object)  # the next fit's image score: (pooling, topk)
    contrast_chosen = Signal(object)  # the next fit's grey-level rule: None (as recorded), "stretch", "flatten"
    budget_chosen = Signal(float)  # seconds the next fit may train a network (trained models)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAcceptDrops(True)
        self.list = QListWidget()
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setIconSize(QSize(56, 56))
        self.list.setGridSize(QSize(64, 64))
        self.list.setResizeMode(QListView.ResizeMode.Adjust)
        self.list.setMovement(QListView.Movement.Static)
        self.list.setUniformItemSizes(True)
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.count_label = QLabel()
        self.count_label.setWordWrap(True)  # a long note must not widen the dock
        self.add_files_button = QPushButton("Add images…")
        self.add_folder_button = QPushButton("Add folder…")
        self.remove_button = QPushButton("Remove")
        self.capture_button = QPushButton("Capture OK from camera…")
        self.capture_button.setToolTip("Grab frames from the camera or video set in the Inspect panel "
                                       "and add them as OK images")
        self.capture_count = QSpinBox()
        self.capture_count.setRange(1, 1000)
        self.capture_count.setValue(1)
        self.capture_count.setSuffix(" frame(s)")
        self.capture_button.clicked.connect(lambda: self.capture_requested.emit(self.capture_count.value()))
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Normality model fitted by the next Fit (see the README's "
                                    "'Which model' for when to pick which)")
        self.model_combo.activated.connect(self._model_activated)
        self._trained: set[str] = set()
        self.budget_spin = QSpinBox()
        self.budget_spin.setRange(1, 24 * 60)
        self.budget_spin.setSuffix(" min")
        self.budget_spin.setToolTip("The longest the next fit may train this model's network; it stops "
                                    "sooner when the held-out OK images stop improving")
        self.budget_box = QWidget()  # shown for models that train a network
        budget_row = QHBoxLayout(self.budget_box)
        budget_row.setContentsMargins(0, 0, 0, 0)
        budget_row.addWidget(QLabel("Train the network for at most"))
        budget_row.addWidget(self.budget_spin)
        budget_row.addStretch(1)
        self.budget_spin.editingFinished.connect(lambda: self.budget_chosen.emit(60.0 * self.budget_spin.value()))
        self.tiling_combo = QComboBox()
        self.tiling_combo.setToolTip("How the next fit sees large images: scaled down whole to the network's "
                                     "size, or as tiles stitched into one map at the image's own size "
                                     "(small defects on multi-megapixel parts; slower per image). Auto tiles "
                                     "when the first OK image's shorter side is at least twice the network's "
                                     "size; 1:1 tiles keep the camera's pixels, half res. halves them. "
                                     "The model keeps the tiling it was fitted with.")
        self.tiling_combo.activated.connect(lambda i: self.tiling_chosen.emit(self.tiling_combo.itemData(i)))
        self.features_combo = QComboBox()
        self.features_combo.setToolTip("What the next fit's Gaussians describe: each patch's own features, "
                                       "or each averaged with its neighbours (more accurate on parts whose "
                                       "good texture varies, e.g. poly-crystalline cells; see the README's "
                                       "'Which model')")
        self.features_combo.activated.connect(
            lambda i: self.neighbourhood_chosen.emit(int(self.features_combo.itemData(i))))
        self.pooling_combo = QComboBox()
        self.pooling_combo.setToolTip("How the next fit turns a heatmap into the image score the threshold "
                                      "judges: the hottest pixel (small defects), the mean of the hottest 2 % "
                                      "(ignores single hot specks; varied parts), or the largest hot region")
        self.pooling_combo.activated.connect(lambda i: self.pooling_chosen.emit(self.pooling_combo.itemData(i)))
        self.contrast_combo = QComboBox()
        self.contrast_combo.setToolTip("Grey levels the next fit's network sees: as recorded; each image "
                                       "stretched from its 1st to its 99th percentile (parts whose exposure varies); "
                                       "or its shading, brightness changing slowly across the part, taken out "
                                       "and then stretched (lighting varies too). Both more accurate on both ELPV "
                                       "cell types, see the README's 'Which model'; whole images only")
        self.contrast_combo.activated.connect(lambda i: self.contrast_chosen.emit(self.contrast_combo.itemData(i)))
        self.fit_button = QPushButton("Fit model  (F5)")
        self.fit_button.setStyleSheet("font-weight:bold; padding:6px;")
        self.cancel_button = QPushButton("Cancel")
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.add_files_button.clicked.connect(self.ask_files)
        self.add_folder_button.clicked.connect(self._ask_folder)
        self.remove_button.clicked.connect(self._remove_selected)
        self.fit_button.clicked.connect(self.fit_requested)
        self.cancel_button.clicked.connect(self.cancel_requested)

        buttons = QHBoxLayout()
        for b in (self.add_files_button, self.add_folder_button, self.remove_button):
            buttons.addWidget(b)
        capture_row = QHBoxLayout()
        capture_row.addWidget(self.capture_button, 1)
        capture_row.addWidget(self.capture_count)
        settings_row = QHBoxLayout()  # what the next fit builds, then the fit itself
        settings_row.addWidget(self.model_combo, 1)
        settings_row.addWidget(self.tiling_combo, 1)
        scoring_row = QHBoxLayout()  # how the next fit describes patches and scores images
        scoring_row.addWidget(self.features_combo, 1)
        scoring_row.addWidget(self.pooling_combo, 1)
        contrast_row = QHBoxLayout()  # what the network sees of the next fit's images
        # as wide as its longest rule (half the row cut "shading flattened" off)
        self.contrast_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        contrast_row.addWidget(self.contrast_combo)
        contrast_row.addStretch(1)
        fit_row = QHBoxLayout()
        fit_row.addWidget(self.fit_button, 1)
        fit_row.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addWidget(self.count_label)
        lay.addWidget(self.list, 1)
        lay.addLayout(buttons)
        lay.addLayout(capture_row)
        lay.addLayout(settings_row)
        lay.addLayout(scoring_row)
        lay.addLayout(contrast_row)
        lay.addWidget(self.budget_box)
        lay.addLayout(fit_row)
        lay.addWidget(self.progress)
        self._thumb_queue: list[QListWidgetItem] = []
        self._unreadable: dict[str, str] = {}  # path -> why the last fit could not read it
        self._thumb_timer = QTimer(self)
        self._thumb_timer.setInterval(0)
        self._thumb_timer.timeout.connect(self._load_some_thumbnails)
        self.set_paths([])
        self.set_busy(False)

    # -- state from the controller -------------------------------------------------------------
    def set_paths(self, paths: list[str]) -> None:
        self.list.clear()
        self._thumb_queue = []
        blank = _blank_icon()  # uniform item sizes are measured on the first item: give it an icon
        for p in paths:
            item = QListWidgetItem(blank, "")
            item.setData(Qt.ItemDataRole.UserRole, p)
            item.setToolTip(p)
            self.list.addItem(item)
            if p in self._unreadable:
                self._mark_unreadable(item, self._unreadable[p])
            else:
                self._thumb_queue.append(item)
        self._update_count()
        if self._thumb_queue:
            self._thumb_timer.start()
        self._update_enabled()

    def set_unreadable(self, unreadable: dict[str, str]) -> None:
        """Mark the OK images the last fit could not read (path -> why): it skipped them, and
        the count says how many (found trying the station: they sat there as blank thumbnails,
        counted as OK images without a word)."""
        was, self._unreadable = self._unreadable, dict(unreadable)
        for i in range(self.list.count()):  # in place: 200 thumbnails are not loaded again
            item = self.list.item(i)
            path = item.data(Qt.ItemDataRole.UserRole)
            if path in self._unreadable:
                if item in self._thumb_queue:
                    self._thumb_queue.remove(item)
                self._mark_unreadable(item, self._unreadable[path])
            elif path in was:  # read this time: its thumbnail again (a blank one if Qt cannot draw it)
                item.setIcon(_blank_icon())
                item.setText("")
                item.setToolTip(path)
                self._thumb_queue.append(item)
                self._thumb_timer.start()
        self._update_count()

    def _mark_unreadable(self, item: QListWidgetItem, reason: str) -> None:
        path = item.data(Qt.ItemDataRole.UserRole)
        item.setIcon(_unreadable_icon())
        item.setText(Path(path).name)
        item.setToolTip(f"{path}\nNot read at the last fit, so not in the model: {reason}")

    def _update_count(self) -> None:
        paths = self.paths()
        text = f"<b>{len(paths)}</b> OK images" + ("" if paths else " — add some, then Fit")
        bad = sum(p in self._unreadable for p in paths)
        if bad:
            text += (f" — <span style='color:#a00'>{bad} could not be read at the last fit and "
                     f"{'was' if bad == 1 else 'were'} left out (marked ✕): remove or replace "
                     f"{'it' if bad == 1 else 'them'}</span>")
        self.count_label.setText(text)

    def set_models(self, models: list[tuple[str, str]], current: str, trained: tuple[str, ...] = (),
                   budget_s: float | None = None) -> None:
        """Fill the chooser with (name, summary) pairs and select ``current``; ``trained``
        names the models that train a network, for which the time budget (``budget_s``) shows."""
        self.model_combo.clear()
        for name, summary in models:
            self.model_combo.addItem(name, name)
            self.model_combo.setItemData(self.model_combo.count() - 1, summary, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(max(self.model_combo.findData(current), 0))
        self._trained = set(trained)
        if budget_s is not None:
            self.budget_spin.setValue(max(1, round(budget_s / 60.0)))
        self.budget_box.setVisible(current in self._trained)

    def _model_activated(self, index: int) -> None:
        name = self.model_combo.itemData(index)
        self.budget_box.setVisible(name in self._trained)
        self.model_chosen.emit(name)

    def set_tilings(self, choices: list[tuple[str, object]], current: object) -> None:
        """Fill the tiling chooser with (label, setting) pairs and select ``current``; a
        setting not offered (a recipe's own tile size) is shown as it is."""
        self.tiling_combo.clear()
        for label, value in choices:
            self.tiling_combo.addItem(label, value)
        if current not in [v for _, v in choices]:
            self.tiling_combo.addItem(f"Tiles of {current} px", current)
        self.tiling_combo.setCurrentIndex([self.tiling_combo.itemData(i) for i in
                                           range(self.tiling_combo.count())].index(current))

    def set_features(self, choices: list[tuple[str, int]] | None, current: int | None) -> None:
        """Fill the features chooser with (label, neighbourhood) pairs and select ``current``;
        hidden for models without that setting (``choices`` None)."""
        self.features_combo.clear()
        self.features_combo.setVisible(choices is not None)
        if choices is None:
            return
        for label, n in choices:
            self.features_combo.addItem(label, n)
        if current not in [n for _, n in choices]:
            self.features_combo.addItem(f"Features: {current} × {current} mean", current)
        self.features_combo.setCurrentIndex(self.features_combo.findData(current))

    def set_contrasts(self, choices: list[tuple[str, object]], current: object) -> None:
        """Fill the grey-level chooser with (label, setting) pairs and select ``current``."""
        self.contrast_combo.clear()
        for label, value in choices:
            self.contrast_combo.addItem(label, value)
        values = [v for _, v in choices]
        self.contrast_combo.setCurrentIndex(values.index(current) if current in values else 0)

    def set_poolings(self, choices: list[tuple[str, tuple[str, int]]], current: tuple[str, int]) -> None:
        """Fill the score chooser with (label, (pooling, topk)) pairs and select ``current``; a
        setting not offered (a recipe's own top-k) is shown as it is."""
        self.pooling_combo.clear()
        for label, value in choices:
            self.pooling_combo.addItem(label, value)
        values = [v for _, v in choices]
        if current not in values:
            name = f"hottest {current[1]} px mean" if current[0] == "topk" else current[0]
            self.pooling_combo.addItem(f"Score: {name}", current)
            values.append(current)
        self.pooling_combo.setCurrentIndex(values.index(current))

    def paths(self) -> list[str]:
        return [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())]

    def set_busy(self, busy: bool) -> None:
        self._busy = busy
        self.cancel_button.setEnabled(busy)
        if not busy:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("idle")
        self._update_enabled()

    def set_progress(self, done: int, total: int, message: str) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        # the bar is as narrow as the dock: a long message (a training epoch's losses) is
        # elided there and whole in the tooltip (and the status bar)
        shown = self.progress.fontMetrics().elidedText(message, Qt.TextElideMode.ElideRight,
                                                       max(self.progress.width() - 12, 40)) if message else ""
        self.progress.setFormat(shown.replace("%", "%%") if shown else "%v/%m")
        self.progress.setToolTip(message)

    def _update_enabled(self) -> None:
        busy = getattr(self, "_busy", False)
        self.fit_button.setEnabled(not busy and self.list.count() > 0)
        self.capture_button.setEnabled(not busy)

    # -- thumbnails, a few per event-loop turn so 200 images never freeze the UI ------------------
    def _load_some_thumbnails(self) -> None:
        for _ in range(THUMBS_PER_TICK):
            if not self._thumb_queue:
                self._thumb_timer.stop()
                return
            item = self._thumb_queue.pop(0)
            icon = file_thumbnail(item.data(Qt.ItemDataRole.UserRole), 56)
            if icon is not None:
                item.setIcon(icon)
            else:
                item.setText(Path(item.data(Qt.ItemDataRole.UserRole)).name)

    # -- user actions -----------------------------------------------------------------------------
    def ask_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Add OK images", "", IMAGE_FILTER)
        if files:
            self.add_requested.emit(files)

    def _ask_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a folder of OK images")
        if folder:
            self.add_requested.emit([folder])

    def _remove_selected(self) -> None:
        paths = [i.data(Qt.ItemDataRole.UserRole) for i in self.list.selectedItems()]
        if paths:
            self.remove_requested.emit(paths)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt override
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802 - Qt override
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.add_requested.emit(paths)
            event.acceptProposedAction()
