"""Running a shift at the window: no lost work, recent recipes, roles, counters, traps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSettings, QTimer

from gui.controller import StationController
from gui.main_window import MainWindow
from gui.recipe_menu import recent_list
from gui.runner import SyncRunner


@pytest.fixture
def window(qtbot, tmp_path, ok_images, tiny_config):
    c = StationController(SyncRunner(), labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    c.session.new_recipe("synthetic", tiny_config, list(ok_images))
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    return w


def _answer_next_box(qtbot, w, text):
    """Click the button labelled ``text`` on the next modal box the window opens."""
    def click():
        box = getattr(w, "question_box", None)
        if box is None or not box.isVisible():
            QTimer.singleShot(20, click)
            return
        next(b for b in box.buttons() if b.text() == text).click()
    QTimer.singleShot(0, click)


def test_quitting_with_unsaved_work_asks_and_cancel_keeps_the_window(qtbot, window, tmp_path):
    w, s = window, window.controller.session
    s.start_fit()
    assert s.dirty and w.windowTitle().endswith("*")
    _answer_next_box(qtbot, w, "Cancel")
    w.close()
    assert w.isVisible() and s.detector is not None  # nothing lost
    _answer_next_box(qtbot, w, "Cancel")
    w.recipe_menu.new_recipe()  # Ctrl+N
    assert s.recipe.name == "synthetic" and s.detector is not None
    _answer_next_box(qtbot, w, "Discard changes")
    w.recipe_menu.new_recipe()
    assert s.recipe.name == "untitled" and not s.dirty


def test_recent_recipes_survive_a_single_entry_and_a_missing_file(qtbot, window, tmp_path):
    w, s = window, window.controller.session
    assert recent_list("solar") == ["solar"] and recent_list(None) == [] and recent_list(["a", "b"]) == ["a", "b"]
    path = tmp_path / "solar.okrecipe"
    s.save_recipe(path)
    w.recipe_menu._remember(str(path))
    w.settings.sync()
    again = QSettings(w.settings.fileName(), QSettings.Format.IniFormat)
    w.settings = again  # a single saved entry comes back from the INI file as a plain string
    w.recipe_menu.update_recent()
    assert [a.text() for a in w.recipe_menu.recent_menu.actions()] == ["solar"]
    path.unlink()
    errors = []
    w.controller.error.connect(errors.append)
    w.recipe_menu.recent_menu.actions()[0].trigger()
    assert errors and "not found" in errors[-1] and w.recipe_menu.recent_menu.isEmpty()


def test_recent_recipes_of_one_name_in_two_folders_are_told_apart(qtbot, window, tmp_path):
    w = window
    a, b = tmp_path / "line1" / "cells.okrecipe", tmp_path / "line2" / "cells.okrecipe"
    w.settings.setValue("recent", [str(a), str(b), str(tmp_path / "solar.okrecipe")])
    w.recipe_menu.update_recent()
    actions = w.recipe_menu.recent_menu.actions()
    assert [x.text() for x in actions] == [f"cells — {a.parent}", f"cells — {b.parent}", "solar"]
    assert [x.toolTip() for x in actions] == [str(a), str(b), str(tmp_path / "solar.okrecipe")]


def test_operator_mode_disables_the_engineer_controls(qtbot, window):
    w, s = window, window.controller.session
    s.start_fit()
    s.set_pin("2468")
    s.lock()
    assert "operator mode" in w.windowTitle()
    assert not w.threshold_panel.isEnabled() and not w.ok_panel.isEnabled()
    assert w.recipe_menu.unlock_action.isEnabled() and not w.recipe_menu.lock_action.isEnabled()
    assert w.labels_panel.isEnabled()  # operators still label...
    lp = w.labels_panel
    assert not lp.reweight_check.isEnabled() and not lp.reset_button.isEnabled()  # ...but weights are set up
    engineer_menu = [w.fit_action, w.reset_weights_action, w.recipe_menu.new_action, w.recipe_menu.save_as_action]
    assert not any(a.isEnabled() for a in engineer_menu)  # the menus grey out what the panels lock
    # keeping NG copies changes the recipe: an engineer's setting (an operator's tick made it unsaved)
    assert not w.shift_panel.copy_ng_check.isEnabled()
    assert not s.set_copy_ng_images(True) and not s.recipe.station.get("copy_ng_images")
    assert s.unlock("2468")
    assert w.shift_panel.copy_ng_check.isEnabled()
    w.shift_panel.copy_ng_check.setChecked(True)
    assert s.recipe.station.get("copy_ng_images") is True
    assert w.threshold_panel.isEnabled() and w.ok_panel.isEnabled()
    assert all(a.isEnabled() for a in engineer_menu)
    assert lp.reweight_check.isEnabled() and not lp.reset_button.isEnabled()  # no weights held yet


def test_before_the_first_fit_no_threshold_is_shown_and_no_false_alarm_warning(qtbot, window):
    """A fresh recipe: nothing is measured yet, so the histogram shows no threshold line (not
    "threshold 0.00") and the false-alarm line says to fit, not (in orange) that held-out OK
    parts are missing; after the fit both show what the model holds."""
    w, s = window, window.controller.session
    assert not w.histogram.line.isVisible()
    assert w.threshold_panel.far_label.text() == "Expected false alarms: — (fit a model first)"
    assert not w.threshold_panel.far_warning
    s.start_fit()
    assert w.histogram.line.isVisible() and w.histogram.threshold() == pytest.approx(s.image_threshold)
    assert "of OK parts" in w.threshold_panel.far_label.text()


def test_shift_counters_follow_the_inspections(qtbot, window, defect_image, ok_images):
    w, s = window, window.controller.session
    s.start_fit()
    s.inspect_paths([defect_image, ok_images[0]])
    sp = w.shift_panel
    assert sp.values["total"].text() == "2"
    assert int(sp.values["ok"].text()) + int(sp.values["ng"].text()) == 2
    w.labels_panel.operator_edit.setText("ana")
    w.labels_panel.operator_edit.editingFinished.emit()
    assert s.operator == "ana" and w.settings.value("operator") == "ana"
    sp.reset_requested.emit()
    assert sp.values["total"].text() == "0"
    # a new shift: the next operator gives a name (the last one's would sign their labels)
    assert s.operator == "" and w.labels_panel.operator() == "" and w.settings.value("operator") == ""


def test_review_ng_of_this_shift_brings_the_ng_parts_back_without_counting_them(qtbot, window, defect_image,
                                                                                ok_images):
    w, s = window, window.controller.session
    s.start_fit()
    s.inspect_paths([defect_image, ok_images[0]])
    ng = [r.path for r in s.results if r.verdict == "NG"]
    assert ng and w.shift_panel.values["errors"].text() == "0"
    qtbot.waitUntil(lambda: w.results_panel.row_count() == 2, timeout=2000)  # rows come throttled
    s.results.clear()  # the table emptied, as after reopening the recipe next morning
    w.results_panel.clear()
    w.shift_panel.review_button.click()
    assert [r.path for r in s.results] == ng
    qtbot.waitUntil(lambda: w.results_panel.row_count() == len(ng), timeout=2000)
    assert w.shift_panel.values["total"].text() == "2"  # not counted again


def test_part_is_ok_and_part_is_ng_wait_for_a_part_on_screen(qtbot, window, defect_image):
    """Found trying the station: after opening a recipe they were enabled and only said "No
    inspected image to label"."""
    w, s = window, window.controller.session
    p = w.labels_panel
    s.start_fit()
    assert s.detector is not None and not p.part_ok_button.isEnabled() and not p.part_ng_button.isEnabled()
    s.inspect_paths([defect_image])
    qtbot.waitUntil(lambda: p.part_ok_button.isEnabled() and p.part_ng_button.isEnabled(), timeout=5000)
    s.clear_results()
    qtbot.waitUntil(lambda: not p.part_ok_button.isEnabled(), timeout=5000)


def test_an_ng_with_nothing_above_the_pixel_threshold_still_shows_where(qtbot, window, defect_image):
    w, s = window, window.controller.session
    s.start_fit()
    s.inspect_paths([defect_image])
    rec = s.shown
    s.set_thresholds(rec.score * 0.5, float(rec.anomaly_map.max()) * 2)  # NG, but no pixel above
    d = s.display()
    assert d.verdict == "NG" and len(d.contours) == 1 and "hottest area" in d.note
    import cv2

    row, col = np.unravel_index(np.argmax(rec.anomaly_map), rec.anomaly_map.shape)
    assert cv2.pointPolygonTest(d.contours[0].astype(np.float32), (float(col), float(row)), False) >= 0
    qtbot.waitUntil(lambda: w.view.outline_count == 1)


def test_live_start_clears_the_previous_verdict_and_locks_the_source(qtbot, window, tmp_path):
    import cv2

    w, s = window, window.controller.session
    s.start_fit()
    shown = []
    w.view.set_verdict = lambda *a: shown.append(a[0])
    video = tmp_path / "v.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    vw.write(np.full((64, 64, 3), 120, np.uint8))
    vw.release()
    states = []
    w.controller.live_changed.connect(lambda on: states.append(
        (on, w.source_panel.target_edit.isEnabled(), w.view.verdict_text)))
    s.start_live("video", str(video))
    assert states[0][:2] == (True, False) and states[-1][:2] == (False, True)
    assert s.recipe.station["live_source"] == ["video", str(video)]
    assert Path(str(video)).exists()


def test_f_in_the_region_popup_marks_a_false_alarm(qtbot, window, defect_image):
    """While the popup has the keyboard the window's F shortcut cannot fire: the popup's own
    mnemonic must (issue 12: 'F does nothing until Esc')."""
    from PySide6.QtCore import Qt

    w, s = window, window.controller.session
    s.operator = "ana"
    s.start_fit()
    s.inspect_paths([defect_image])
    rec = s.shown
    s.set_thresholds(s.image_threshold, float(np.percentile(rec.anomaly_map, 90)))
    from core.regions import find_regions

    region = find_regions(rec.anomaly_map, s.pixel_threshold)[0]
    row, col = np.argwhere(region.mask)[len(np.argwhere(region.mask)) // 2]
    w.view.pixel_clicked.emit(int(row), int(col))
    menu = w.label_menu
    qtbot.waitUntil(menu.isVisible)
    saved = []
    w.controller.label_saved.connect(saved.append)
    qtbot.keyClick(menu, Qt.Key.Key_F)
    qtbot.waitUntil(lambda: saved == [1])
    assert s.labels.rows()[0].kind == "false_alarm"


def test_the_no_model_banner_goes_once_a_model_is_there(qtbot, window, defect_image):
    w, s = window, window.controller.session
    s.inspect_paths([defect_image])  # no model yet
    assert w.error_banner.isVisible() and "No model yet" in w.error_label.text()
    s.start_fit()
    assert not w.error_banner.isVisible()


def test_an_earlier_actions_error_banner_goes_when_the_next_job_starts(qtbot, window, defect_image, tmp_path):
    """Found trying the station: "No images to inspect were found." (an empty folder) stayed
    over the next folder's results. An error of the very action that starts a job stays."""
    w, s = window, window.controller.session
    s.start_fit()
    (tmp_path / "empty").mkdir()
    s.inspect_paths([str(tmp_path / "empty")])
    assert w.error_banner.isVisible() and "No images to inspect" in w.error_label.text()
    s.inspect_paths([defect_image])  # at once: as if said by this action
    assert w.error_banner.isVisible()
    w._error_at -= w.STALE_ERROR_S  # an earlier action's
    s.inspect_paths([defect_image])
    assert not w.error_banner.isVisible()


def test_an_error_banner_never_moves_the_image_the_operator_is_clicking_on(qtbot, window):
    """It floats over the top of the image area (it used to push the image down by its height,
    so the next click landed elsewhere) and stays as wide as that area."""
    w = window
    qtbot.waitExposed(w)
    before = w.view.geometry()
    w.show_error("Enter your name (Labels panel) before labelling a part")
    qtbot.wait(100)  # any layout change would have happened by now
    assert w.error_banner.isVisible() and "Enter your name" in w.error_label.text()
    assert w.view.geometry() == before
    area = w.view.graphics  # the image area, below the verdict and score
    assert w.error_banner.parentWidget() is area
    assert w.error_banner.geometry().top() == 0 and w.error_banner.width() == area.width()
    banner = w.error_banner.geometry().translated(area.mapTo(w, area.rect().topLeft()))
    verdict = w.view.verdict_label.geometry().translated(
        w.view.verdict_label.parentWidget().mapTo(w, w.view.verdict_label.parentWidget().rect().topLeft()))
    assert not banner.intersects(verdict)  # the verdict stays in sight (it hid half of the big NG)
    w.resize(w.width() - 120, w.height())
    qtbot.waitUntil(lambda: w.error_banner.width() == area.width(), timeout=2000)
    qtbot.wait(100)
    resized = w.view.geometry()
    w.error_banner.findChild(type(w.labels_panel.reset_button)).click()  # Dismiss
    qtbot.wait(100)
    assert not w.error_banner.isVisible() and w.view.geometry() == resized


def test_every_message_stays_whole_in_the_messages_tab_with_its_time(qtbot, window, tmp_path, defect_image):
    """Found trying the station: the status line showed a message for seconds and cut a long
    one at the window's edge, and the banner only the latest error, so an earlier message
    (a recovery note, the fit's note on one held-out part) was nowhere to be read again."""
    w, s = window, window.controller.session
    qtbot.waitExposed(w)
    s.start_fit()  # says how the fit went
    (tmp_path / "empty").mkdir()
    s.inspect_paths([str(tmp_path / "empty")])  # an error
    long = "a very long note " * 30
    w.show_error(long.strip())  # a later error covers the first in the banner
    kept = w.messages_panel.messages()
    assert any("Fitted" in m or "fitted" in m for m in kept), kept
    errors = [m for m in kept if "Error: " in m]
    assert len(errors) == 2 and "No images to inspect" in errors[0] and errors[1].endswith(long.strip())
    assert all(m[:8].count(":") == 2 and m[2] == ":" for m in kept)  # HH:MM:SS first
    assert w.statusBar().toolTip() == long.strip()  # whole where the status line cuts it
    assert w.messages_dock.windowTitle() == "Messages (2 new errors)"  # Inspect was the raised tab
    w.messages_dock.raise_()
    qtbot.waitUntil(lambda: w.messages_dock.windowTitle() == "Messages", timeout=2000)
    w.messages_panel.clear_button.click()
    assert w.messages_panel.messages() == []


def test_the_features_and_score_chosen_in_the_window_are_the_ones_fitted(qtbot, window):
    panel, s = window.ok_panel, window.controller.session
    assert panel.features_combo.isVisible() and panel.features_combo.currentData() == 1
    panel.features_combo.activated.emit(1)
    assert s.config.model_params["neighbourhood"] == 3 and panel.features_combo.currentData() == 3
    panel.pooling_combo.activated.emit(1)
    assert s.config.pooling == "topk" and panel.pooling_combo.currentIndex() == 1
    assert panel.contrast_combo.currentData() is None
    assert [panel.contrast_combo.itemData(i) for i in range(panel.contrast_combo.count())] == [
        None, "stretch", "flatten"]
    panel.contrast_combo.activated.emit(1)
    assert s.config.contrast == "stretch" and panel.contrast_combo.currentData() == "stretch"
    with qtbot.waitSignal(window.controller.model_changed, timeout=60000):
        s.start_fit()
    assert s.detector.model.neighbourhood == 3 and s.detector.post.pooling == "topk"
    assert s.detector.config.contrast == "stretch"
    panel.tiling_combo.activated.emit(2)  # tiles: the stretch works on whole images
    assert "stretch works on whole images" in window.error_label.text() and s.config.tile is None
    panel.model_combo.activated.emit(panel.model_combo.findData("favae"))  # trains a network: no such setting
    assert not panel.features_combo.isVisible() and panel.pooling_combo.isVisible()


def test_quitting_lets_a_save_whose_model_is_being_written_end_first(qtbot, window, monkeypatch):
    """"Save" in the quit question queues the model's write on the engine thread: the window
    waits for it (the engine then stops) instead of cutting it off half-way."""
    import time

    w, s = window, window.controller.session
    s.saving = True
    QTimer.singleShot(100, lambda: setattr(s, "saving", False))  # the engine's save ending
    t0 = time.monotonic()
    w._let_the_save_end(30)
    assert not s.saving and time.monotonic() - t0 < 10
    waited = []
    monkeypatch.setattr(w, "_let_the_save_end", lambda: waited.append(True))
    monkeypatch.setattr(w.recipe_menu, "confirm_discard", lambda _what: True)
    w.close()
    assert waited == [True]


def test_with_the_engine_thread_a_save_ends_before_the_new_recipe_the_question_allowed(
        qtbot, tmp_path, ok_images, tiny_config):
    """The real engine thread writes the model after save_recipe returns: the station stays
    on its recipe until then, and "Save" in the question before New waits for it."""
    from gui.runner import EngineRunner

    runner = EngineRunner()
    c = StationController(runner, labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    s = c.session
    try:
        s.new_recipe("synthetic", tiny_config, list(ok_images))
        with qtbot.waitSignal(c.model_changed, timeout=60_000):
            s.start_fit()
        path = tmp_path / "a.okrecipe"
        s.save_recipe(path)
        assert s.saving and s.recipe_path is None  # the model is still being written
        qtbot.waitUntil(lambda: not s.saving, timeout=60_000)
        assert s.recipe_path == path and not s.dirty and path.is_file()
        with qtbot.waitSignal(c.model_changed, timeout=60_000):
            s.start_fit()
        assert s.dirty
        stamp = (path.with_suffix(".okng")).stat().st_mtime_ns
        _answer_next_box(qtbot, w, "Save")
        w.recipe_menu.new_recipe()  # Ctrl+N, "Save": the refit is written, then the new recipe
        assert s.recipe.name == "untitled" and not s.saving
        assert path.with_suffix(".okng").stat().st_mtime_ns != stamp
    finally:
        assert runner.shutdown(10_000)


def test_ok_images_the_fit_could_not_read_are_marked_and_not_counted_as_seen(qtbot, window, tmp_path):
    """Found trying the station: after "3 image(s) could not be read and were skipped" the OK
    set still said "15 OK images" beside blank thumbnails."""
    w, s = window, window.controller.session
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    s.add_ok_paths([str(broken)])
    n = len(s.ok_paths)
    s.start_fit()
    assert s.detector is not None and str(broken) in s.unreadable_ok
    text = w.ok_panel.count_label.text()
    assert f"<b>{n}</b> OK images" in text and "1 could not be read at the last fit and was left out" in text
    item = next(w.ok_panel.list.item(i) for i in range(w.ok_panel.list.count())
                if w.ok_panel.list.item(i).data(0x0100) == str(broken))
    assert item.text() == "broken.png" and "Not read at the last fit" in item.toolTip()
    cross = item.icon().pixmap(56, 56).toImage()
    assert cross.pixelColor(28, 28).red() > 150 and cross.pixelColor(28, 28).green() < 60  # the red cross
    s.unreadable_ok_changed.emit({})  # read at a later fit: the cross and its note go
    assert item.text() == "" and item.toolTip() == str(broken)
    assert item.icon().pixmap(56, 56).toImage().pixelColor(28, 28).red() < 240  # not the cross's red
    assert "could not be read" not in w.ok_panel.count_label.text()
    s.unreadable_ok_changed.emit({str(broken): "not a picture"})
    s.remove_ok_paths([str(broken)])
    assert "could not be read" not in w.ok_panel.count_label.text()
    s.new_recipe("fresh")
    assert s.unreadable_ok == {}


def test_a_reopened_recipe_still_marks_the_ok_images_its_fit_could_not_read(qtbot, window, tmp_path):
    """Found trying the station: saved and reopened, the recipe listed them as plain OK images
    again until the next fit. A fit that reads them all clears the marks in the recipe too."""
    w, s = window, window.controller.session
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    s.add_ok_paths([str(broken)])
    s.start_fit()
    path = tmp_path / "kept.okrecipe"
    s.save_recipe(path)
    s.new_recipe("fresh")
    w.recipe_menu.open(str(path), confirmed=True)
    qtbot.waitUntil(lambda: s.detector is not None)
    assert s.unreadable_ok and str(broken) in s.unreadable_ok
    assert "1 could not be read at the last fit" in w.ok_panel.count_label.text()
    s.remove_ok_paths([str(broken)])
    s.start_fit()
    s.save_recipe(path)
    s.open_recipe(path)
    assert s.unreadable_ok == {} and "could not be read" not in w.ok_panel.count_label.text()


def test_reopening_the_open_recipe_with_unsaved_changes_is_asked_as_a_reopen(qtbot, window, tmp_path):
    """It used to ask "Save them before you open another recipe?" for the recipe already open."""
    w, s = window, window.controller.session
    path = tmp_path / "line1.okrecipe"
    assert s.save_recipe(path)
    w._let_the_save_end()
    s.set_thresholds(1.0, 1.0)
    assert s.dirty
    asked = []

    def answer():
        box = getattr(w, "question_box", None)
        if box is None or not box.isVisible():
            QTimer.singleShot(20, answer)
            return
        asked.append(box.text())
        next(b for b in box.buttons() if b.text() == "Cancel").click()
    QTimer.singleShot(0, answer)
    w.recipe_menu.open(str(path))
    assert "reopen it as it was last saved" in asked[0] and s.dirty  # Cancel: nothing changed


def test_a_model_file_opened_as_a_recipe_is_refused_before_any_question_and_named_as_a_model(
        qtbot, window, tmp_path, monkeypatch):
    """Found trying the station: opening a model from okng fit asked about unsaved changes,
    then said "not a readable OK/NG recipe (file is not a database)"."""
    w, s = window, window.controller.session
    s.start_fit()
    model = tmp_path / "cli.okng"
    s.save_recipe(tmp_path / "saved.okrecipe")
    (tmp_path / "saved.okng").rename(model)
    s.set_thresholds(1.0, 1.0)
    asked, errors = [], []
    monkeypatch.setattr(w.recipe_menu, "confirm_discard", lambda doing: asked.append(doing) or True)
    s.error.connect(errors.append)
    w.recipe_menu.open(str(model))
    assert asked == [] and s.dirty and s.recipe_path == tmp_path / "saved.okrecipe"
    assert errors[-1].startswith("Cannot open recipe: cli.okng is a model file, not a recipe")
    assert "okng score --model cli.okng" in errors[-1]
    w.recipe_menu.open(str(tmp_path / "saved.okrecipe"))  # a real recipe is asked about, then opened
    assert asked and s.recipe_path == tmp_path / "saved.okrecipe"


def test_save_as_waits_until_the_window_stops_serving_the_line(qtbot, window, tmp_path, monkeypatch):
    """The line logs its parts beside the recipe it was started with: saved elsewhere while
    serving, the window's counters would no longer see the line's parts."""
    from PySide6.QtWidgets import QFileDialog

    w, s = window, window.controller.session
    asked = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        lambda *a, **k: asked.append(a) or (str(tmp_path / "elsewhere.okrecipe"), ""))
    monkeypatch.setattr(type(w.line_link), "serving", property(lambda self: True))
    errors = []
    s.error.connect(errors.append)
    w.recipe_menu.save_as()
    assert asked == [] and errors[-1].startswith("Stop serving the line") and s.recipe_path is None


def test_a_refused_save_as_is_not_added_to_the_recent_recipes(qtbot, window, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    w, s = window, window.controller.session
    protected = tmp_path / "line1.okrecipe"
    assert s.set_pin("4711") and s.save_recipe(protected)
    w._let_the_save_end()
    w.settings.setValue("recent", [])
    s.new_recipe("untitled", s.config, list(s.ok_paths))  # no PIN: may not replace line1
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(protected), ""))
    w.recipe_menu.save_as()
    assert "protected by an engineer PIN" in w.error_label.text()
    assert recent_list(w.settings.value("recent")) == []
    other = tmp_path / "line2.okrecipe"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(other), ""))
    w.recipe_menu.save_as()
    assert recent_list(w.settings.value("recent")) == [str(other)]
