"""MainWindow: docks the panels around the inspection view; intents go to the session, the
controller's signals come back to the panels."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths, Qt, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QHBoxLayout, QLabel, QMainWindow, QMessageBox,
                               QPushButton, QVBoxLayout, QWidget)

from core.session_results import heat_vmax

from .labeling import install_labeling
from .panels.histogram_panel import HistogramPanel
from .panels.ok_set_panel import OkSetPanel
from .panels.results_panel import ResultsPanel
from .panels.source_panel import SourcePanel
from .panels.threshold_panel import ThresholdPanel
from .views.inspection_view import InspectionView

APP_TITLE = "OK/NG Station"
RECIPE_FILTER = "OK/NG recipes (*.okrecipe)"
MAX_RECENT = 8


class MainWindow(QMainWindow):
    def __init__(self, controller, settings: QSettings | None = None) -> None:
        super().__init__()
        self.controller = c = controller
        self.settings = settings or QSettings("OKNG", "OK-NG Station")
        self.view = InspectionView()
        self.ok_panel = OkSetPanel()
        self.source_panel = SourcePanel()
        self.threshold_panel = ThresholdPanel()
        self.histogram = HistogramPanel()
        self.results_panel = ResultsPanel()
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("background:#ffd7d7; color:#800; padding:6px; font-weight:bold;")
        dismiss = QPushButton("Dismiss")
        dismiss.clicked.connect(lambda: self.error_banner.hide())
        self.error_banner = QWidget()
        row = QHBoxLayout(self.error_banner)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.error_label, 1)
        row.addWidget(dismiss)
        self.error_banner.hide()
        central = QWidget()
        lay = QVBoxLayout(central)
        lay.addWidget(self.error_banner)
        lay.addWidget(self.view, 1)
        self.setCentralWidget(central)
        self._dock("OK images", self.ok_panel, Qt.DockWidgetArea.LeftDockWidgetArea)
        self._dock("Inspect", self.source_panel, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.threshold_panel.setTitle("")  # the dock says it already
        right = [self._dock("Thresholds", self.threshold_panel, Qt.DockWidgetArea.RightDockWidgetArea),
                 self._dock("Score histogram", self.histogram, Qt.DockWidgetArea.RightDockWidgetArea),
                 self._dock("Results", self.results_panel, Qt.DockWidgetArea.RightDockWidgetArea)]
        self._build_actions()
        self._wire()
        self.labels_panel, labels_dock = install_labeling(self)  # dock, Label menu, click popup
        self.resizeDocks([*right, labels_dock], [150, 260, 200, 330], Qt.Orientation.Vertical)
        self.resizeDocks(right[:1], [560], Qt.Orientation.Horizontal)
        self.on_recipe_changed(c.session.recipe.name)
        self.ok_panel.set_paths(c.session.ok_paths)
        self.resize(1500, 950)
        geometry = self.settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
            self.restoreState(self.settings.value("window/state"))

    def _dock(self, title: str, widget: QWidget, area) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title)
        dock.setWidget(widget)
        feature = QDockWidget.DockWidgetFeature
        dock.setFeatures(feature.DockWidgetMovable | feature.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    def _action(self, menu, text: str, slot, shortcut=None) -> QAction:
        a = QAction(text, self)
        if shortcut:
            a.setShortcut(QKeySequence(shortcut))
            a.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        a.triggered.connect(slot)
        menu.addAction(a)
        self.addAction(a)
        return a

    def _build_actions(self) -> None:
        s = self.controller.session
        m = self.menuBar().addMenu("&Recipe")
        self._action(m, "&New recipe", lambda: s.new_recipe("untitled"), QKeySequence.StandardKey.New)
        self._action(m, "&Open recipe…", self.open_recipe_dialog, "Ctrl+Shift+O")
        self.recent_menu = m.addMenu("Open &recent")
        self._action(m, "&Save recipe", self.save_recipe, QKeySequence.StandardKey.Save)
        self._action(m, "Save recipe &as…", self.save_recipe_as, "Ctrl+Shift+S")
        m.addSeparator()
        self._action(m, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        m = self.menuBar().addMenu("&Inspect")
        self._action(m, "&Open images to inspect…", self.source_panel._ask_files, "Ctrl+O")
        self._action(m, "&Fit model", s.start_fit, "F5")
        self.demo_action = self._action(m, "Inspect &demo stream", s.inspect_demo_stream, "Ctrl+D")
        self._action(m, "Start/stop &live", self.source_panel.request_live_toggle, "F6")
        self._action(m, "&Next image / stop live", self.next_or_stop, "Space")
        self._action(m, "&Cancel", s.cancel, "Esc")
        self._update_recent_menu()

    def _wire(self) -> None:
        c, s = self.controller, self.controller.session
        # intents go straight to the Qt-free session
        self.ok_panel.add_requested.connect(s.add_ok_paths)
        self.ok_panel.remove_requested.connect(s.remove_ok_paths)
        self.ok_panel.fit_requested.connect(s.start_fit)
        self.ok_panel.model_chosen.connect(s.set_model)
        self.ok_panel.cancel_requested.connect(s.cancel)
        self.ok_panel.capture_requested.connect(self.capture_ok)
        self.source_panel.inspect_files_requested.connect(s.inspect_paths)
        self.source_panel.inspect_folder_requested.connect(lambda f: s.inspect_paths([f]))
        self.source_panel.demo_stream_requested.connect(s.inspect_demo_stream)
        self.source_panel.live_requested.connect(s.start_live)
        self.source_panel.stop_requested.connect(s.stop_live)
        self.threshold_panel.thresholds_changed.connect(s.set_thresholds)
        self.histogram.threshold_moved.connect(self.on_histogram_moved)
        self.results_panel.result_selected.connect(s.show_result)
        # notifications come back as the controller's Qt signals
        c.ok_paths_changed.connect(self.ok_panel.set_paths)
        c.recipe_changed.connect(self.on_recipe_changed)
        c.model_changed.connect(self.on_model_changed)
        c.thresholds_changed.connect(self.on_thresholds_changed)
        c.result_added.connect(self.on_result_added)
        c.results_changed.connect(self.on_results_changed)
        c.display_changed.connect(self.on_display)
        c.busy_changed.connect(self.ok_panel.set_busy)
        c.progress.connect(self.on_progress)
        c.live_changed.connect(self.source_panel.set_live)
        c.status.connect(lambda msg: self.statusBar().showMessage(msg, 15000))
        c.error.connect(self.show_error)
        c.question_asked.connect(self.ask)

    # -- controller -> widgets -----------------------------------------------------------------
    @Slot(str)
    def on_recipe_changed(self, name: str) -> None:
        s = self.controller.session
        self.setWindowTitle(f"{APP_TITLE} — {name}")
        self.ok_panel.set_models(s.available_models(), s.config.model)
        self.source_panel.demo_button.setVisible(bool(s.demo_stream))
        self.results_panel.clear()
        self.view.clear()

    @Slot()
    def on_model_changed(self) -> None:
        s = self.controller.session
        cal, peaks, seen = s.calibration_scores(), s.calibration_peaks(), s.inspected_scores()
        image, pixel = s.image_threshold or 0.0, s.pixel_threshold or 0.0
        top_i = max([image, *cal.tolist(), *seen.tolist(), 1e-3]) * 2.0
        top_p = max([pixel, *peaks.tolist(), 1e-3]) * 2.0
        self.threshold_panel.configure(image, pixel, (0.0, top_i), (0.0, top_p), cal)
        self.histogram.set_threshold(image)
        self.histogram.set_scores(cal, seen)
        self.view.set_pixel_threshold(pixel, heat_vmax(pixel))

    @Slot(float, float)
    def on_thresholds_changed(self, image: float, pixel: float) -> None:
        if self.threshold_panel.values() != (image, pixel):
            self.threshold_panel.set_values(image, pixel)
        self.histogram.set_threshold(image)
        self.view.set_pixel_threshold(pixel, heat_vmax(pixel))

    @Slot(float)
    def on_histogram_moved(self, value: float) -> None:
        s = self.controller.session
        s.set_thresholds(value, s.pixel_threshold or 0.0)

    @Slot(object)
    def on_result_added(self, rec) -> None:
        self.results_panel.add_result(rec.id, rec.name, rec.score, rec.verdict, rec.seconds, rec.thumbnail)
        self.histogram.set_scores(inspected=self.controller.session.inspected_scores())

    @Slot()
    def on_results_changed(self) -> None:
        s = self.controller.session
        if not len(s.results):
            self.results_panel.clear()
        self.results_panel.set_verdicts({r.id: r.verdict for r in s.results},
                                        {r.id: r.score for r in s.results},
                                        {r.id: r.changed_from for r in s.results if r.changed_from})
        self.histogram.set_scores(inspected=s.inspected_scores())

    @Slot(object)
    def on_display(self, d) -> None:
        self.view.set_image(d.image, d.name)
        self.view.set_anomaly_map(d.anomaly_map)
        self.view.set_regions(d.contours)
        self.view.set_verdict(d.verdict, d.score, d.image_threshold)

    @Slot(int, int, str)
    def on_progress(self, done: int, total: int, message: str) -> None:
        self.ok_panel.set_progress(done, total, message)
        self.statusBar().showMessage(message, 5000)

    @Slot(str)
    def show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_banner.show()
        self.statusBar().showMessage(message, 15000)

    @Slot(object)
    def ask(self, q) -> None:
        """A decision the session leaves to a person: a modal question, its buttons the options."""
        box = QMessageBox(QMessageBox.Icon.Question, q.title, q.text, parent=self)
        buttons = {box.addButton(opt, QMessageBox.ButtonRole.AcceptRole): opt for opt in q.options}
        default = next(b for b, opt in buttons.items() if opt == q.default)
        box.setDefaultButton(default)
        box.setEscapeButton(default)
        self.question_box = box  # reachable for tests
        box.exec()
        q.answer(buttons.get(box.clickedButton(), q.default))

    @Slot(int)
    def capture_ok(self, count: int) -> None:
        """Capture OK frames from the live source configured in the Inspect panel."""
        sp = self.source_panel
        self.controller.session.capture_ok(sp.live_kind(), sp.target_edit.text().strip(), count)

    # -- recipes, recent list, shortcuts ----------------------------------------------------
    def next_or_stop(self) -> None:
        if self.controller.session.live:
            self.controller.session.stop_live()
        else:
            self.results_panel.select_next()

    def _recipes_dir(self) -> str:
        d = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)) / "recipes"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    def open_recipe_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", self._recipes_dir(), RECIPE_FILTER)
        if path:
            self.open_recipe(path)

    def open_recipe(self, path: str) -> None:
        self.controller.session.open_recipe(path)
        self._remember(path)

    def save_recipe(self) -> None:
        s = self.controller.session
        if not s.save_recipe():
            self.save_recipe_as()
        elif s.recipe_path:
            self._remember(str(s.recipe_path))

    def save_recipe_as(self) -> None:
        from core.recipes import safe_file_stem  # tiny, Qt-free helper module

        start = str(Path(self._recipes_dir()) / (safe_file_stem(self.controller.session.recipe.name) + ".okrecipe"))
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", start, RECIPE_FILTER)
        if path:
            path = path if path.endswith(".okrecipe") else path + ".okrecipe"
            self.controller.session.save_recipe(path)
            self._remember(path)

    def _remember(self, path: str) -> None:
        recent = [p for p in (self.settings.value("recent") or []) if p != path]
        self.settings.setValue("recent", [path, *recent][:MAX_RECENT])
        self._update_recent_menu()

    def _update_recent_menu(self) -> None:
        self.recent_menu.clear()
        for p in self.settings.value("recent") or []:
            self.recent_menu.addAction(Path(p).stem, lambda p=p: self.open_recipe(p))
        self.recent_menu.setEnabled(not self.recent_menu.isEmpty())

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        # The engine stops at its next cancellation point (at most one batch, or the backbone
        # load); destroying a running QThread would abort the process, so wait generously.
        self.controller.shutdown(60000)
        super().closeEvent(event)
