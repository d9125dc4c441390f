"""Each panel alone, fed plain numpy data (no engine)."""
import numpy as np
import pytest
from PySide6.QtCore import QPointF

from gui.panels.histogram_panel import HistogramPanel
from gui.panels.ok_set_panel import OkSetPanel
from gui.panels.results_panel import ResultsPanel
from gui.panels.threshold_panel import ThresholdPanel
from gui.views.inspection_view import InspectionView


def test_threshold_slider_and_spin_stay_in_sync(qtbot):
    panel = ThresholdPanel()
    qtbot.addWidget(panel)
    panel.configure(5.0, 3.0, (0.0, 10.0), (0.0, 6.0), np.array([1.0, 2.0, 4.0, 6.0]))
    assert panel.image_row.slider.value() == 500
    assert "25.0%" in panel.far_label.text()  # one of four calibration scores above 5
    with qtbot.waitSignal(panel.thresholds_changed) as blocker:
        panel.image_row.slider.setValue(300)
    assert blocker.args[0] == pytest.approx(3.0)
    assert blocker.args[1] == pytest.approx(3.0)
    assert panel.image_row.spin.value() == pytest.approx(3.0)
    assert "50.0%" in panel.far_label.text()
    emitted = []
    panel.thresholds_changed.connect(lambda a, b: emitted.append((a, b)))
    panel.pixel_row.spin.setValue(4.5)
    assert emitted == [(pytest.approx(3.0), pytest.approx(4.5))]  # exactly once
    assert panel.pixel_row.slider.value() == 750
    panel.set_values(1.0, 1.0)  # programmatic: no signal
    assert len(emitted) == 1


def test_histogram_line_emits_only_on_user_move(qtbot):
    h = HistogramPanel()
    qtbot.addWidget(h)
    h.set_scores(np.array([1.0, 1.2, 1.4]), np.array([1.1, 3.0]))
    x, y = h.ok_curve.getData()
    assert y.sum() == pytest.approx(1.0)  # a share of the 3 calibration images per bin
    assert h.counts() == (3, 2)
    with qtbot.assertNotEmitted(h.threshold_moved):
        h.set_threshold(2.0)
    assert h.threshold() == 2.0
    with qtbot.waitSignal(h.threshold_moved) as blocker:
        h.line.setValue(2.5)  # what a drag does
    assert blocker.args == [2.5]


def test_inspection_view_heat_levels_regions_and_click(qtbot):
    v = InspectionView()
    qtbot.addWidget(v)
    v.resize(600, 600)
    v.show()
    img = np.zeros((300, 200, 3), np.uint8)
    amap = np.zeros((50, 50), np.float32)
    amap[10:20, 30:40] = 5.0
    v.set_image(img, "part")
    v.set_pixel_threshold(2.0, 4.0)
    v.set_anomaly_map(amap)
    assert v.heat.levels is not None and tuple(v.heat.levels) == (2.0, 4.0)
    v.set_pixel_threshold(3.0, 6.0)
    assert tuple(v.heat.levels) == (3.0, 6.0)
    # the map is stretched over the image: its rect is the image's
    r = v.heat.mapRectToParent(v.heat.boundingRect())
    assert (r.width(), r.height()) == (200, 300)
    v.set_regions([np.array([[30, 10], [39, 10], [39, 19], [30, 19]])])
    assert v.outline_count == 1
    box = v._outlines[0].path().boundingRect()
    assert box.left() == pytest.approx(30.5 * 4) and box.top() == pytest.approx(10.5 * 6)
    # a click on map pixel (row 15, col 35) = image point (35.5*4, 15.5*6)
    scene = v.heat.mapToScene(QPointF(35.5, 15.5))
    assert v.map_pixel_at_scene(scene) == (15, 35)
    with qtbot.waitSignal(v.pixel_clicked) as blocker:
        v._on_scene_clicked(_FakeClick(scene))
    assert blocker.args == [15, 35]
    v.set_verdict("NG", 7.5, 5.0)
    assert v.verdict_text == "NG" and "7.50 / threshold 5.00" in v.detail_label.text()
    v.set_verdict("OK", 2.0, 5.0)
    assert v.verdict_text == "OK"


class _FakeClick:
    def __init__(self, pos):
        self._pos = pos

    def button(self):
        from PySide6.QtCore import Qt
        return Qt.MouseButton.LeftButton

    def scenePos(self):  # noqa: N802
        return self._pos


def test_results_panel_rows_selection_and_rejudge(qtbot):
    p = ResultsPanel()
    qtbot.addWidget(p)
    thumb = np.zeros((40, 40, 3), np.uint8)
    p.add_result(7, "a.png", 1.0, "OK", 0.01, thumb)
    p.add_result(8, "b.png", 9.0, "NG", 0.02, None)
    assert p.row_count() == 2
    with qtbot.waitSignal(p.result_selected) as blocker:
        p.select_row(1)
    assert blocker.args == [8]
    p.set_verdicts({7: "NG"})
    assert p.table.item(0, 3).text() == "NG"
    with qtbot.waitSignal(p.result_selected) as blocker:
        p.select_row(0)
    assert blocker.args == [7]


def test_ok_set_panel_lists_thumbnails_and_requests(qtbot, ok_images):
    p = OkSetPanel()
    qtbot.addWidget(p)
    assert not p.fit_button.isEnabled()
    p.set_paths(ok_images)
    assert "8" in p.count_label.text() and p.fit_button.isEnabled()
    qtbot.waitUntil(lambda: not p.list.item(7).icon().isNull())
    p.list.item(0).setSelected(True)
    with qtbot.waitSignal(p.remove_requested) as blocker:
        p.remove_button.click()
    assert blocker.args == [[ok_images[0]]]
    with qtbot.waitSignal(p.fit_requested):
        p.fit_button.click()
    p.set_busy(True)
    assert not p.fit_button.isEnabled() and p.cancel_button.isEnabled()
    with qtbot.waitSignal(p.cancel_requested):
        p.cancel_button.click()


def test_ok_set_panel_model_chooser_emits_the_chosen_name(qtbot):
    from gui.panels.ok_set_panel import OkSetPanel

    panel = OkSetPanel()
    qtbot.addWidget(panel)
    panel.set_models([("padim", "one Gaussian"), ("patchcore", "memory bank")], "patchcore")
    assert panel.model_combo.currentText() == "patchcore"
    with qtbot.waitSignal(panel.model_chosen) as sig:
        panel.model_combo.activated.emit(0)
    assert sig.args == ["padim"]


def test_ok_set_panel_tiling_chooser_shows_the_recipes_tiling_and_emits_the_chosen_one(qtbot):
    from gui.panels.ok_set_panel import OkSetPanel

    panel = OkSetPanel()
    qtbot.addWidget(panel)
    choices = [("Whole image", None), ("Auto", "auto"), ("Tiles of 224 px", 224)]
    panel.set_tilings(choices, "auto")
    assert panel.tiling_combo.currentText() == "Auto"
    panel.set_tilings(choices, 300)  # a recipe's own tile size is shown as it is
    assert panel.tiling_combo.currentText() == "Tiles of 300 px" and panel.tiling_combo.count() == 4
    with qtbot.waitSignal(panel.tiling_chosen) as sig:
        panel.tiling_combo.activated.emit(2)
    assert sig.args == [224]


def test_results_panel_adds_a_batch_of_rows_in_order_and_keeps_the_newest(qtbot, monkeypatch):
    from gui.panels import results_panel

    monkeypatch.setattr(results_panel, "MAX_ROWS", 5)
    panel = ResultsPanel()
    qtbot.addWidget(panel)
    panel.add_result(1, "a.png", 1.0, "OK", 0.01)
    panel.add_results([(i, f"p{i}.png", float(i), "NG" if i % 2 else "OK", 0.01, None) for i in range(2, 8)])
    assert panel.row_count() == 5
    assert [panel.table.item(r, 1).text() for r in range(5)] == [f"p{i}.png" for i in range(3, 8)]
    panel.set_filter(results_panel.SHOW_NG)
    assert panel.visible_count() == 3 and panel.shown_label.text() == "3 of 5"


def test_throttle_runs_at_once_then_once_per_interval_never_losing_the_last(qtbot):
    from gui.throttle import Throttle

    calls = []
    t = Throttle(80, lambda: calls.append(1))
    t.request()
    assert calls == [1]  # not run for a while: at once (a single result, a click)
    for _ in range(10):
        t.request()
    assert calls == [1]  # a burst inside the interval waits...
    qtbot.waitUntil(lambda: len(calls) == 2, timeout=1000)  # ...and runs once at its end
    qtbot.wait(150)
    assert len(calls) == 2
    t.request()
    t.request()
    assert len(calls) == 3  # the interval had passed: at once; the second one waits
    t.flush()  # a pending update runs now
    assert len(calls) == 4
    t.flush()  # nothing pending: nothing runs
    assert len(calls) == 4


def test_ok_set_panel_shows_the_training_budget_only_for_a_model_that_trains(qtbot):
    from gui.panels.ok_set_panel import OkSetPanel

    panel = OkSetPanel()
    qtbot.addWidget(panel)
    panel.show()
    panel.set_models([("padim", "one Gaussian"), ("kdad", "student")], "padim", ("kdad",), None)
    assert not panel.budget_spin.isVisible()
    with qtbot.waitSignal(panel.model_chosen):
        panel.model_combo.activated.emit(1)
    assert panel.budget_spin.isVisible()
    panel.budget_spin.setValue(3)
    with qtbot.waitSignal(panel.budget_chosen) as sig:
        panel.budget_spin.editingFinished.emit()
    assert sig.args == [180.0]
    panel.set_models([("padim", "one Gaussian"), ("kdad", "student")], "kdad", ("kdad",), 1500.0)
    assert panel.budget_spin.value() == 25 and panel.budget_spin.isVisible()


def test_ok_set_panel_features_and_score_choosers_show_the_recipe_and_emit_the_choice(qtbot):
    from gui.panels.ok_set_panel import OkSetPanel

    panel = OkSetPanel()
    qtbot.addWidget(panel)
    panel.show()
    panel.set_features([("own patch", 1), ("averaged 3 × 3", 3)], 3)
    assert panel.features_combo.isVisible() and panel.features_combo.currentText() == "averaged 3 × 3"
    with qtbot.waitSignal(panel.neighbourhood_chosen) as sig:
        panel.features_combo.activated.emit(0)
    assert sig.args == [1]
    panel.set_features(None, None)  # a model without the setting
    assert not panel.features_combo.isVisible()
    scores = [("hottest pixel", ("max", 100)), ("hottest 2 %", ("topk", 1000))]
    panel.set_poolings(scores, ("topk", 500))  # a recipe's own top-k is shown as it is
    assert panel.pooling_combo.currentText() == "Score: hottest 500 px mean" and panel.pooling_combo.count() == 3
    with qtbot.waitSignal(panel.pooling_chosen) as sig:
        panel.pooling_combo.activated.emit(1)
    assert tuple(sig.args[0]) == ("topk", 1000)
