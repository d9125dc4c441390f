"""Click-to-label feedback: the labels panel alone, and the controller with a small real detector."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PySide6.QtCore import QSettings

from core import find_regions
from core.labels import LabelStore
from gui.controller import StationController
from gui.panels.labels_panel import LabelsPanel
from gui.runner import SyncRunner
from gui.views.inspection_view import InspectionView


def test_labels_panel_with_plain_data(qtbot):
    p = LabelsPanel()
    qtbot.addWidget(p)
    assert not p.false_alarm_button.isEnabled() and not p.undo_button.isEnabled()
    rows = [SimpleNamespace(id=1, created_at=1.7e9, image_name="a.png", kind="false_alarm", score_before=9.5,
                            score_after=4.25, undone=False, in_model=True),
            SimpleNamespace(id=2, created_at=1.7e9, image_name="b.png", kind="image_ng", score_before=3.0,
                            score_after=None, undone=True, in_model=False, undone_by="ana", undone_at=1.7e9 + 60),
            SimpleNamespace(id=3, created_at=1.7e9, image_name="c.png", kind="false_alarm", score_before=8.0,
                            score_after=None, undone=False, in_model=False)]
    p.set_rows(rows)
    assert p.table.rowCount() == 3
    assert "not in model" not in p.table.item(0, 2).text() + p.table.item(1, 2).text()
    assert "not in model" in p.table.item(2, 2).text()  # active but not replayed into this model
    assert p.table.item(0, 3).text() == "9.50 → 4.25" and p.table.item(0, 2).text() == "false alarm"
    assert "undone" in p.table.item(1, 2).text() and p.table.item(1, 2).font().strikeOut()
    assert p.table.item(1, 2).toolTip().startswith("Taken out ") and "by ana" in p.table.item(1, 2).toolTip()
    p.set_region_selected(True)
    with qtbot.waitSignal(p.mark_requested) as m:
        p.false_alarm_button.click()
    assert m.args == ["false_alarm"]
    p.set_model_ready(True)
    with qtbot.waitSignal(p.mark_requested) as m:
        p.part_ok_button.click()
    assert m.args == ["image_ok"]
    p.set_can_undo(True)
    with qtbot.waitSignal(p.undo_requested):
        p.undo_button.click()
    p.set_weight_change(SimpleNamespace(strength=0.5, stage_mean_weight={"stage 2": 1.0, "stage 3": 0.81},
                                        lowest=[(115, 0.26), (7, 0.5)]))
    assert "stage 3 0.81" in p.changed_label.text() and "#115 0.26" in p.changed_label.text()
    assert "strength 0.5" in p.changed_label.text()
    p.set_weight_change(SimpleNamespace(strength=None, stage_mean_weight={"stage 3": 0.9}, lowest=[(4, 0.3)]))
    assert p.changed_label.text().startswith("<b>Channel weights the model holds</b>")  # after a fit or open
    p.set_weight_change(None)
    assert "unchanged" in p.changed_label.text()
    p.set_held_back("Channel weights held back: strength 1 refused, it would pass cell_7 <NG> (judged NG).")
    assert "unchanged" in p.changed_label.text() and "cell_7 &lt;NG&gt; (judged NG)" in p.changed_label.text()
    p.set_weight_change(None)  # the next change: the note was about the label before
    assert "held back" not in p.changed_label.text()
    p.operator_edit.setText("ana")
    with qtbot.waitSignal(p.operator_changed) as op:
        p.operator_edit.editingFinished.emit()
    assert op.args == ["ana"]


@pytest.fixture
def station(qtbot, ok_images, tiny_config, defect_image, tmp_path):
    """Fitted on the synthetic OK parts, the defect image inspected and shown, regions visible."""
    c = StationController(SyncRunner(), labels_dir=tmp_path / "labels")
    c.session.new_recipe("synthetic", tiny_config)
    c.session.add_ok_paths([str(Path(ok_images[0]).parent)])
    c.session.operator = "ben"
    c.session.start_fit()
    with qtbot.waitSignal(c.display_changed):
        c.session.inspect_paths([defect_image])
    rec = c.session.results.get(c.session.shown_id)
    c.session.set_thresholds(c.session.image_threshold, float(np.percentile(rec.anomaly_map, 90)))  # a localised region
    return c


def test_click_region_mark_false_alarm_then_undo(qtbot, station, defect_image):
    c, fb = station, station.session.labels
    fb.operator = "ana"
    rec = c.session.results.get(c.session.shown_id)
    regions = find_regions(rec.anomaly_map, c.session.pixel_threshold)
    assert regions
    view = InspectionView()
    qtbot.addWidget(view)
    view.pixel_clicked.connect(fb.select_at)
    # a click on empty space selects and submits nothing
    empty = np.argwhere(~np.any([r.mask for r in regions], axis=0))[0]
    with qtbot.waitSignal(c.status) as st:
        view.pixel_clicked.emit(int(empty[0]), int(empty[1]))
    assert "nothing labelled" in st.args[0] and not fb.has_selection
    submitted = []
    c.runner.busy_changed.connect(submitted.append)
    fb.mark_region("false_alarm")
    assert submitted == [] and not fb.store_path.exists()
    # a click inside the hottest region, then "false alarm (this is fine)"
    row, col = np.unravel_index(np.argmax(np.where(regions[0].mask, rec.anomaly_map, -np.inf)), rec.anomaly_map.shape)
    view.pixel_clicked.emit(int(row), int(col))
    assert fb.has_selection
    before, before_map, model_before = rec.score, rec.anomaly_map, c.session.detector
    saved = []
    fb.label_saved.connect(saved.append)
    with qtbot.waitSignal(c.display_changed):
        fb.mark_region("false_alarm")
    assert saved and c.session.detector is not model_before
    assert rec.score < before  # re-inspected under the new model
    assert c.session.image_threshold == model_before.thresholds.image  # the operator's thresholds stay
    with LabelStore(fb.store_path) as fresh:  # committed: visible to a new connection
        (lab,) = fresh.labels()
    assert lab.id == saved[0] and lab.kind == "false_alarm" and lab.operator == "ana"
    assert lab.image_path == defect_image and len(lab.image_sha256) == 64 and lab.model_id.startswith("fit@")
    assert lab.score == pytest.approx(before, rel=1e-4)
    assert np.array_equal(lab.region.mask, regions[0].mask)
    assert fb.rows()[0].score_after == pytest.approx(rec.score)
    # undo: previous model, previous score exactly, label kept but marked undone
    with qtbot.waitSignal(c.display_changed):
        fb.undo_last()
    assert rec.score == before and rec.anomaly_map is before_map
    with LabelStore(fb.store_path) as fresh:
        assert fresh.labels() == []
        assert fresh.labels(include_undone=True)[0].undone_at is not None
    assert fb.rows()[0].undone


def test_part_ok_joins_ok_set_export_and_failed_store(qtbot, station, defect_image, tmp_path):
    c, fb = station, station.session.labels
    fb.mark_image("image_ok")
    assert defect_image in c.session.ok_paths
    out = tmp_path / "labels.csv"
    fb.export(str(out))
    text = out.read_text()
    assert "image_ok" in text and "defect.png" in text
    fb.export(str(tmp_path / "labels.json"))
    assert '"kind": "image_ok"' in (tmp_path / "labels.json").read_text()
    errors = []
    c.error.connect(errors.append)
    fb.export(str(tmp_path / "labels.txt"))  # it used to get CSV, silently
    assert not (tmp_path / "labels.txt").exists() and "name the file .csv or .json" in errors[-1]
    fb.undo_last()
    assert defect_image not in c.session.ok_paths
    # a label that cannot be committed is not acknowledged and the model goes back
    def broken_add(label):
        raise OSError("disk full")

    fb.store().add = broken_add
    errors = []
    c.error.connect(errors.append)
    fb.mark_image("image_ng")
    assert errors and "NOT saved" in errors[-1]
    assert not fb.can_undo and not fb.learner.can_undo and c.session.detector is not None
    assert fb.rows()[-1].kind == "image_ok"  # nothing new in the store


def test_a_labels_row_menu_withdraws_an_active_label_and_restores_a_withdrawn_one(qtbot):
    p = LabelsPanel()
    qtbot.addWidget(p)
    p.set_rows([SimpleNamespace(id=4, created_at=1.7e9, image_name="a.png", kind="false_alarm", score_before=9.5,
                                score_after=4.25, undone=False, in_model=True),
                SimpleNamespace(id=5, created_at=1.7e9, image_name="b.png", kind="defect", score_before=3.0,
                                score_after=None, undone=True, in_model=True)])
    assert p.table.item(1, 2).text() == "real defect  (withdrawn, until refit)"
    assert "still holds it until you fit again" in p.table.item(1, 2).toolTip()
    (withdraw,) = p.row_menu(4).actions()
    assert withdraw.text().startswith("Withdraw label #4")
    with qtbot.waitSignal(p.withdraw_requested) as got:
        withdraw.trigger()
    assert got.args == [4]
    (restore,) = p.row_menu(5).actions()
    with qtbot.waitSignal(p.restore_requested) as got:
        restore.trigger()
    assert got.args == [5]
    p.set_engineer_controls(False)  # an operator: the menu says what it would do, disabled
    assert not p.row_menu(4).actions()[0].isEnabled()


def test_main_window_popup_and_labels_panel(qtbot, station, tmp_path):
    from gui.main_window import MainWindow

    c = station
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    c.session.show_result(c.session.shown_id)
    qtbot.waitUntil(lambda: w.view.outline_count >= 1)
    rec = c.session.results.get(c.session.shown_id)
    region = find_regions(rec.anomaly_map, c.session.pixel_threshold)[0]
    row, col = np.argwhere(region.mask)[len(np.argwhere(region.mask)) // 2]
    w.view.pixel_clicked.emit(int(row), int(col))
    assert w.view.has_selected_region and w.labels_panel.false_alarm_button.isEnabled()
    menu = w.label_menu
    qtbot.waitUntil(menu.isVisible)
    before = rec.score
    menu.actions()[0].trigger()  # "False alarm (this is fine)"
    menu.close()
    qtbot.waitUntil(lambda: w.labels_panel.table.rowCount() == 1)
    assert rec.score < before and w.labels_panel.undo_button.isEnabled()
    assert "→" in w.labels_panel.table.item(0, 3).text()
    qtbot.waitUntil(lambda: f"{rec.score:.2f}" in w.view.detail_label.text())
    c.session.mark_saved()  # unsaved work is asked about: tests/gui/test_operator_station.py
    w.close()


def test_the_labels_panel_greys_out_channel_weights_for_a_model_that_learns_none(qtbot):
    p = LabelsPanel()
    qtbot.addWidget(p)
    p.set_model_ready(True)
    assert p.reweight_check.isEnabled() and not p.reset_button.isEnabled()  # no weights held: nothing to reset
    p.set_weight_change(SimpleNamespace(strength=1.0, stage_mean_weight={"stage 3": 0.9}, lowest=[(4, 0.3)]))
    assert p.reset_button.isEnabled()
    p.set_weights_learnable(False)  # a trained model (riad, favae, kdad)
    assert not p.reweight_check.isEnabled() and not p.reset_button.isEnabled()
    assert "learns no channel weights" in p.reweight_check.toolTip()
    assert "learns no channel weights" in p.changed_label.text()
    p.set_weight_change(None)  # after a label: still says why nothing is weighted
    assert "learns no channel weights" in p.changed_label.text()
    p.set_engineer_controls(True)
    assert not p.reweight_check.isEnabled()  # unlocking does not bring it back
    p.set_weights_learnable(True)  # a PaDiM model again
    assert p.reweight_check.isEnabled() and "Learn channel weights" in p.changed_label.text()


def test_the_status_line_keeps_how_a_step_ended_over_the_progress_of_the_work_it_queued(qtbot, station, tmp_path):
    """A refit ends by saying how many labels it replayed and then re-judges the results on
    the engine thread; a declined label says so and then reverts: the queued job's progress
    arrives after the outcome and must not overwrite it on the status line (the progress
    bar shows it). Progress later than that shows there again."""
    from gui.main_window import MainWindow

    c = station
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    c.status.emit("1 stored label(s) replayed into the new model")
    c.progress.emit(0, 3, "re-judging 3 results under the new model")
    assert w.statusBar().currentMessage() == "1 stored label(s) replayed into the new model"
    c.error.emit("Label not applied; the model is unchanged.")
    c.progress.emit(0, 1, "undoing the last label")
    assert w.statusBar().currentMessage() == "Label not applied; the model is unchanged."
    w.OUTCOME_HOLD_S = 0.0  # the outcome has been up long enough
    c.progress.emit(1, 3, "re-judging 3 results under the new model")
    assert w.statusBar().currentMessage() == "re-judging 3 results under the new model"
    c.session.mark_saved()
    w.close()
