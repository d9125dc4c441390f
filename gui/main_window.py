"""MainWindow: docks the panels around the inspection view; intents go to the session, the
controller's signals come back to the panels. Menus live in gui/recipe_menu.py and
gui/labeling.py."""
from __future__ import annotations

import time

from PySide6.QtCore import QEventLoop, QSettings, Qt, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QApplication, QDockWidget, QMainWindow, QMessageBox, QVBoxLayout,
                               QWidget)

from core.models import TRAINED_KINDS
from core.session_results import heat_vmax
from core.thresholds import false_alarm_statement

from .labeling import install_labeling
from .line_link import install_line_link
from .panels.error_banner import ErrorBanner
from .panels.histogram_panel import HistogramPanel
from .panels.messages_panel import MessagesPanel
from .panels.ok_set_panel import OkSetPanel
from .panels.results_panel import ResultsPanel
from .panels.shift_panel import ShiftPanel
from .panels.source_panel import SourcePanel
from .panels.threshold_panel import ThresholdPanel
from .recipe_menu import RecipeMenu
from .throttle import Throttle
from .views.inspection_view import InspectionView

APP_TITLE = "OK/NG Station"
#: during live inspection new result rows are added at most this often (ms), and the score
#: histogram redrawn at most this often: per result they were most of the UI thread's time
ROWS_EVERY_MS = 100
HISTOGRAM_EVERY_MS = 250


class MainWindow(QMainWindow):
    def __init__(self, controller, settings: QSettings | None = None) -> None:
        super().__init__()
        self.controller = c = controller
        self.settings = settings or QSettings("OKNG", "OK-NG Station")
        self.view = InspectionView()
        self._new_rows: list = []  # results whose row is not in the table yet (see on_result_added)
        self._said_at = -1e9  # when the status line last said how something ended (on_progress)
        self._error_at = -1e9  # when the error banner was last shown
        self._rows_update = Throttle(ROWS_EVERY_MS, self._add_new_rows, self)
        self._histogram_update = Throttle(HISTOGRAM_EVERY_MS, self._update_inspected_histogram, self)
        self.ok_panel = OkSetPanel()
        self.source_panel = SourcePanel()
        self.threshold_panel = ThresholdPanel()
        self.histogram = HistogramPanel()
        self.results_panel = ResultsPanel()
        self.shift_panel = ShiftPanel()
        self.messages_panel = MessagesPanel()
        central = QWidget()
        lay = QVBoxLayout(central)
        lay.addWidget(self.view, 1)
        # floats over the top of the image area: the image never moves, and the verdict and
        # score above it stay in sight (over the whole view it hid half of the big NG)
        self.error_banner = ErrorBanner(self.view.graphics)
        self.error_label = self.error_banner.label
        self.statusBar()  # made now: made at the first message, it would shrink the image area then
        self.setCentralWidget(central)
        left, right = Qt.DockWidgetArea.LeftDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea
        self.add_dock("OK images", self.ok_panel, left)
        self.add_dock("Inspect", self.source_panel, left)
        shift_dock = self.shift_dock = self.add_dock("Shift", self.shift_panel, left)
        self.threshold_panel.setTitle("")  # the dock says it already
        docks = [self.add_dock("Thresholds", self.threshold_panel, right),
                 self.add_dock("Score histogram", self.histogram, right),
                 self.add_dock("Results", self.results_panel, right)]
        self.recipe_menu = RecipeMenu(self)
        self._build_inspect_menu()
        self._wire()
        self.labels_panel, labels_dock = install_labeling(self)  # dock, Label menu, click popup
        # Inspect and Shift in one tab group before the Line dock joins Shift's: tabified the
        # other way round, Shift stayed behind a raised Line tab, apart from Inspect
        self.tabifyDockWidget(self.findChild(QDockWidget, "Inspect"), shift_dock)
        self.line_link = install_line_link(self)  # the Line dock: a PLC triggers this window
        self.messages_dock = self.add_dock("Messages", self.messages_panel, left)
        self.tabifyDockWidget(shift_dock, self.messages_dock)
        self.messages_dock.visibilityChanged.connect(self._on_messages_visible)
        self.resizeDocks([*docks, labels_dock], [150, 190, 280, 330], Qt.Orientation.Vertical)
        self.resizeDocks(docks[:1], [560], Qt.Orientation.Horizontal)
        self.findChild(QDockWidget, "Inspect").raise_()
        self.threshold_panel.set_far_describer(self.describe_false_alarms)
        self.on_recipe_changed(c.session.recipe.name)
        self.ok_panel.set_paths(c.session.ok_paths)
        self.resize(1500, 950)
        geometry = self.settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
            self.restoreState(self.settings.value("window/state"))

    def add_dock(self, title: str, widget: QWidget, area) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title)
        dock.setWidget(widget)
        feature = QDockWidget.DockWidgetFeature
        dock.setFeatures(feature.DockWidgetMovable | feature.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    def add_action(self, menu, text: str, slot, shortcut=None) -> QAction:
        a = QAction(text, self)
        if shortcut:
            a.setShortcut(QKeySequence(shortcut))
            a.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        a.triggered.connect(slot)
        menu.addAction(a)
        self.addAction(a)
        return a

    def _build_inspect_menu(self) -> None:
        s = self.controller.session
        m = self.inspect_menu = self.menuBar().addMenu("&Inspect")
        self.add_action(m, "&Open images to inspect…", self.source_panel.ask_files, "Ctrl+O")
        self.fit_action = self.add_action(m, "&Fit model", s.start_fit, "F5")
        self.demo_action = self.add_action(m, "Inspect &demo stream", s.inspect_demo_stream, "Ctrl+D")
        self.add_action(m, "Start/stop &live", self.source_panel.request_live_toggle, "F6")
        self.add_action(m, "&Next image / stop live", self.next_or_stop, "Space")
        self.add_action(m, "&Cancel", s.cancel, "Esc")

    def _wire(self) -> None:
        c, s = self.controller, self.controller.session
        # intents go straight to the Qt-free session
        self.ok_panel.add_requested.connect(s.add_ok_paths)
        self.ok_panel.remove_requested.connect(s.remove_ok_paths)
        self.ok_panel.fit_requested.connect(s.start_fit)
        self.ok_panel.model_chosen.connect(s.set_model)
        self.ok_panel.model_chosen.connect(lambda _name: self._show_models())  # what the session kept
        self.ok_panel.budget_chosen.connect(s.set_training_budget)
        self.ok_panel.tiling_chosen.connect(s.set_tiling)
        self.ok_panel.neighbourhood_chosen.connect(s.set_neighbourhood)
        self.ok_panel.neighbourhood_chosen.connect(lambda _n: self._show_scoring())  # what the session kept
        self.ok_panel.pooling_chosen.connect(lambda choice: s.set_pooling(tuple(choice)))
        self.ok_panel.pooling_chosen.connect(lambda _c: self._show_scoring())
        self.ok_panel.contrast_chosen.connect(s.set_contrast)
        self.ok_panel.contrast_chosen.connect(lambda _c: self._show_scoring())  # what the session kept
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
        self.shift_panel.reset_requested.connect(s.shift.reset_counters)
        self.shift_panel.export_requested.connect(s.shift.export)
        self.shift_panel.review_requested.connect(s.shift.review)
        self.shift_panel.copy_ng_toggled.connect(
            lambda on: s.set_copy_ng_images(on) or self.shift_panel.set_copy_ng(not on))  # refused: as it was
        # notifications come back as the controller's Qt signals
        c.ok_paths_changed.connect(self.ok_panel.set_paths)
        c.unreadable_ok_changed.connect(self.ok_panel.set_unreadable)
        c.recipe_changed.connect(self.on_recipe_changed)
        c.model_changed.connect(self.on_model_changed)
        c.thresholds_changed.connect(self.on_thresholds_changed)
        c.result_added.connect(self.on_result_added)
        c.results_changed.connect(self.on_results_changed)
        c.display_changed.connect(self.on_display)
        c.busy_changed.connect(self.ok_panel.set_busy)
        c.busy_changed.connect(self._on_busy_changed)
        c.progress.connect(self.on_progress)
        c.live_changed.connect(self.on_live_changed)
        c.status.connect(self.show_status)
        c.error.connect(self.show_error)
        c.question_asked.connect(self.ask)
        c.counters_changed.connect(self.shift_panel.set_counters)
        c.role_changed.connect(self.on_role_changed)
        c.dirty_changed.connect(lambda _d: self._update_title())

    # -- controller -> widgets -----------------------------------------------------------------
    def _update_title(self) -> None:
        s = self.controller.session
        role = "  [operator mode]" if s.role == "operator" else ""
        self.setWindowTitle(f"{APP_TITLE} — {s.recipe.name}{' *' if s.dirty else ''}{role}")

    def _show_models(self) -> None:
        s = self.controller.session
        self.ok_panel.set_models(s.available_models(), s.config.model, TRAINED_KINDS, s.training_budget())
        self._show_scoring()

    def _show_scoring(self) -> None:
        s = self.controller.session
        self.ok_panel.set_features(s.feature_choices(), s.neighbourhood())
        self.ok_panel.set_poolings(s.pooling_choices(), (s.config.pooling, s.config.topk))
        self.ok_panel.set_contrasts(s.contrast_choices(), s.config.contrast)

    @Slot(str)
    def on_recipe_changed(self, name: str) -> None:
        s = self.controller.session
        self._update_title()
        self._show_models()
        self.ok_panel.set_tilings(s.tiling_choices(), s.config.tile)
        self.source_panel.demo_button.setVisible(bool(s.demo_stream))
        live = s.recipe.station.get("live_source")
        if isinstance(live, list) and len(live) == 2 and live[0] in ("camera", "video", "folder"):
            self.source_panel.set_live_target(str(live[0]), str(live[1]))
        self.shift_panel.set_copy_ng(bool(s.recipe.station.get("copy_ng_images")))
        self.shift_panel.set_counters(s.shift.counters())
        self.on_role_changed(s.role)
        self.results_panel.clear()
        self.view.clear()
        self.error_banner.hide()  # an error about the previous recipe is stale now

    @Slot(str)
    def on_role_changed(self, role: str) -> None:
        locked = role == "operator"
        self.threshold_panel.setEnabled(not locked and self.controller.session.detector is not None)
        self.ok_panel.setEnabled(not locked)
        self.fit_action.setEnabled(not locked)  # the menu greys out what the panels do
        self.reset_weights_action.setEnabled(not locked)
        self.labels_panel.set_engineer_controls(not locked)
        self.shift_panel.copy_ng_check.setEnabled(not locked)  # a recipe setting, like the thresholds
        self.histogram.line.setMovable(not locked)
        self.recipe_menu.show_role(role)
        self._update_title()

    @Slot()
    def on_model_changed(self) -> None:
        s = self.controller.session
        cal, peaks, seen = s.calibration_scores(), s.calibration_peaks(), s.inspected_scores()
        image, pixel = s.image_threshold or 0.0, s.pixel_threshold or 0.0
        top_i = max([image, *cal.tolist(), *seen.tolist(), 1e-3]) * 2.0
        top_p = max([pixel, *peaks.tolist(), 1e-3]) * 2.0
        self.threshold_panel.configure(image, pixel, (0.0, top_i), (0.0, top_p), cal)
        self.histogram.set_threshold(image if s.image_threshold is not None else None)
        self.histogram.set_scores(cal, seen)
        self.view.set_pixel_threshold(pixel, heat_vmax(pixel))
        if s.detector is not None:
            self.error_banner.hide()  # "no model yet" and fit errors are answered now
        self.labels_panel.set_weights_learnable(s.detector is None or s.detector.model.supports_channel_weights)
        self.on_role_changed(s.role)

    def describe_false_alarms(self, threshold: float) -> tuple[str, bool]:
        """The expected false-alarm rate at ``threshold`` with its honest bound, for the panel."""
        det = self.controller.session.detector
        if det is None:  # nothing to measure yet: not a warning about held-out parts
            return "Expected false alarms: — (fit a model first)", False
        text, warn = false_alarm_statement(det.thresholds, threshold)
        return f"Expected false alarms: {text}", warn

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
        """A new result: its row and the histogram follow, throttled (gui/throttle.py); the
        image itself is rendered by the controller, every frame the UI keeps up with."""
        self._new_rows.append(rec)
        self._rows_update.request()
        self._histogram_update.request()

    def _add_new_rows(self) -> None:
        recs, self._new_rows = self._new_rows, []
        self.results_panel.add_results([(r.id, r.name, r.score, r.verdict, r.seconds, r.thumbnail) for r in recs])

    def _update_inspected_histogram(self) -> None:
        self.histogram.set_scores(inspected=self.controller.session.inspected_scores())

    @Slot()
    def on_results_changed(self) -> None:
        s = self.controller.session
        if not len(s.results):
            self._new_rows.clear()  # rows of results cleared before they were shown
            self.results_panel.clear()
        self._rows_update.flush()  # every row there before the verdicts are repainted
        if self.results_panel.row_count() > len(s.results):
            self.results_panel.keep_only({r.id for r in s.results})
        self.results_panel.set_verdicts({r.id: r.verdict for r in s.results},
                                        {r.id: r.score for r in s.results},
                                        {r.id: r.changed_from for r in s.results if r.changed_from})
        if self.view.shown_key is not None and self.view.shown_key not in s.results:
            self.view.show_waiting("The result shown left the table (see the status line)")
        self.histogram.set_scores(inspected=s.inspected_scores())

    @Slot(object)
    def on_display(self, d) -> None:
        self.view.set_image(d.image, d.name, key=d.result_id)  # a new result shows whole (zoom reset)
        self.view.set_anomaly_map(d.anomaly_map)
        self.view.set_regions(d.contours)
        self.view.set_verdict(d.verdict, d.score, d.image_threshold)
        self.view.set_note(d.note)

    @Slot(bool)
    def on_live_changed(self, running: bool) -> None:
        self.source_panel.set_live(running)
        if running:  # the previous run's verdict must not stay up until the first frame
            self.view.show_waiting("Live: waiting for the first frame…")
            self.view.setFocus()  # Space stops live; it must not type into a text field

    #: seconds an outcome stays on the status line before a job's progress may replace it
    OUTCOME_HOLD_S = 3.0

    @Slot(int, int, str)
    def on_progress(self, done: int, total: int, message: str) -> None:
        self.ok_panel.set_progress(done, total, message)
        # a job queued by the step that just said how it ended (a refit's re-judging after its
        # replay, a declined label's revert) must not overwrite that outcome with its progress
        if time.monotonic() - self._said_at >= self.OUTCOME_HOLD_S:
            self.statusBar().showMessage(message, 5000)

    @Slot(str)
    def show_status(self, message: str) -> None:
        self._said_at = time.monotonic()
        self.statusBar().showMessage(message, 15000)
        self.statusBar().setToolTip(message)  # whole, where the line cuts it
        self.messages_panel.add(message)

    #: an error shown at least this long before a new job starts belongs to an earlier action
    STALE_ERROR_S = 1.0

    def _on_busy_changed(self, busy: bool) -> None:
        """A new job (an inspection, a fit, a save) takes the banner of an earlier action down:
        found trying the station, "No images to inspect were found." stayed over the next
        folder's results. An error said by the very action that starts the job stays."""
        if busy and time.monotonic() - self._error_at >= self.STALE_ERROR_S:
            self.error_banner.hide()

    @Slot(str)
    def show_error(self, message: str) -> None:
        self._error_at = time.monotonic()
        self.error_banner.show_message(message)
        self._said_at = time.monotonic()
        self.statusBar().showMessage(message, 15000)
        self.statusBar().setToolTip(message)
        self.messages_panel.add(message, error=True)
        self._title_messages()

    def _on_messages_visible(self, visible: bool) -> None:
        if visible:
            self.messages_panel.seen()
        self._title_messages()

    def _title_messages(self) -> None:
        """The Messages tab counts the errors that came while it was out of sight."""
        n, dock = self.messages_panel.unseen_errors, getattr(self, "messages_dock", None)
        if dock is not None:  # an error said while the window is still being built
            dock.setWindowTitle(f"Messages ({n} new error{'s' if n > 1 else ''})" if n else "Messages")

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

    def next_or_stop(self) -> None:
        if self.controller.session.live:
            self.controller.session.stop_live()
        else:
            self.results_panel.select_next()

    def open_recipe(self, path: str) -> None:
        self.recipe_menu.open(path, confirmed=True)

    def _let_the_save_end(self, seconds: float = 120.0) -> None:
        """A save whose model is still being written (e.g. "Save" in the quit question) ends
        before the engine stops: stopped half-way it would leave this session's labels beside
        the other recipe, or be cancelled and lost."""
        s = self.controller.session
        deadline = time.monotonic() + seconds
        while s.saving and time.monotonic() < deadline:
            QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        if not self.recipe_menu.confirm_discard("quit"):
            event.ignore()
            return
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self._let_the_save_end()
        # The engine stops at its next cancellation point (at most one batch, or the backbone
        # load); destroying a running QThread would abort the process, so wait generously.
        self.line_link.stop()
        self.controller.shutdown(60000)
        super().closeEvent(event)
