"""What an operator running a shift needs from the panels: values never clamped, a histogram
that shows both series and its labels, a results list that fits and filters, a view that always
has something to look at. Each panel alone, fed plain numpy data (no engine)."""
import numpy as np
import pytest
from PySide6.QtCore import QRectF

from gui.panels.histogram_panel import HistogramPanel
from gui.panels.results_panel import ResultsPanel
from gui.panels.threshold_panel import STEPS, ThresholdPanel
from gui.views.inspection_view import InspectionView


# -- thresholds ---------------------------------------------------------------------------------
def _slider_step(row, value):
    return round((value - row.lo) / (row.hi - row.lo) * STEPS)


def test_threshold_value_beyond_the_range_is_shown_not_clamped(qtbot):
    panel = ThresholdPanel()
    qtbot.addWidget(panel)
    panel.configure(66.9, 60.0, (0.0, 133.8), (0.0, 120.0), np.linspace(20, 70, 40))
    panel.set_values(700.0, 500.0)  # e.g. the histogram line dragged far to the right
    row = panel.image_row
    assert row.spin.value() == 700.0 and panel.pixel_row.spin.value() == 500.0
    assert row.spin.maximum() >= 700.0
    assert row.slider.value() == _slider_step(row, 700.0) < STEPS  # the handle where 700 is, not pinned
    emitted = []
    panel.thresholds_changed.connect(lambda a, b: emitted.append((a, b)))
    panel.pixel_row.spin.setValue(400.0)  # touching the other row judges at 700, not at a clamp
    assert emitted == [(700.0, 400.0)]
    panel.set_values(-5.0, 1.0)  # below the range too
    assert row.spin.value() == -5.0 and row.slider.value() == _slider_step(row, -5.0)


def test_threshold_values_are_kept_exact_and_small_scales_get_decimals(qtbot):
    panel = ThresholdPanel()
    qtbot.addWidget(panel)
    panel.configure(66.86812, 60.123456, (0.0, 133.7), (0.0, 120.0))
    assert panel.values() == (66.86812, 60.123456)  # the spin box shows 66.868, the station keeps the rest
    emitted = []
    panel.thresholds_changed.connect(lambda a, b: emitted.append((a, b)))
    panel.pixel_row.spin.setValue(50.0)
    assert emitted == [(66.86812, 50.0)]
    panel.configure(0.00123, 0.0005, (0.0, 0.0025), (0.0, 0.001), keep_range=False)  # a small-score model
    assert panel.image_row.spin.value() == pytest.approx(0.00123, abs=1e-9)
    assert panel.image_row.spin.text().replace(",", ".").startswith("0.00123")


def test_threshold_refit_with_an_unchanged_value_keeps_the_handle_still(qtbot):
    panel = ThresholdPanel()
    qtbot.addWidget(panel)
    panel.configure(5.0, 3.0, (0.0, 10.0), (0.0, 6.0), np.array([1.0, 2.0, 4.0, 6.0]))
    before = panel.image_row.slider.value(), panel.pixel_row.slider.value()
    panel.configure(5.0, 3.0, (0.0, 12.0), (0.0, 5.0), np.array([1.0, 2.0, 4.0, 7.0]))  # after a label
    assert (panel.image_row.slider.value(), panel.pixel_row.slider.value()) == before
    assert panel.values() == (5.0, 3.0)
    panel.configure(0.05, 0.03, (0.0, 0.1), (0.0, 0.06))  # another model: another scale
    assert panel.image_row.slider.value() == 500 and panel.image_row.hi == pytest.approx(0.1)


def test_threshold_far_describer_writes_the_line_and_may_warn(qtbot):
    panel = ThresholdPanel()
    qtbot.addWidget(panel)
    panel.configure(5.0, 3.0, (0.0, 10.0), (0.0, 6.0), np.array([1.0, 2.0, 4.0, 6.0]))
    seen = []

    def describe(t):
        seen.append(t)
        return (f"Expected false alarms at {t:.1f}: too few held-out parts to show 1 %: need 299", t < 5.5)

    panel.resize(360, 150)
    panel.show()
    qtbot.waitExposed(panel)
    panel.set_far_describer(describe)
    assert panel.far_label.text().startswith("Expected false alarms at 5.0: too few")
    label = panel.far_label
    assert label.height() >= label.heightForWidth(label.width()) > label.fontMetrics().height()  # all lines
    assert panel.far_label.wordWrap() and panel.far_warning
    assert "#b35900" in panel.far_label.styleSheet()  # orange
    panel.image_row.slider.setValue(800)  # the operator moves the threshold
    assert seen[-1] == pytest.approx(8.0) and not panel.far_warning
    assert panel.far_label.styleSheet() == ""
    panel.set_far_describer(lambda t: f"plain {t:.0f}")  # a str alone: no warning
    assert panel.far_label.text() == "plain 8" and not panel.far_warning
    panel.set_far_describer(None)  # back to the built-in text
    assert "0.0% of OK parts (4 calibration images)" in panel.far_label.text()


# -- histogram ----------------------------------------------------------------------------------
@pytest.fixture
def histogram(qtbot):
    h = HistogramPanel()
    qtbot.addWidget(h)
    h.resize(500, 260)
    h.show()
    qtbot.waitExposed(h)
    rng = np.random.default_rng(0)
    h.set_scores(rng.normal(30, 8, 40), np.concatenate([rng.normal(32, 8, 2000), [84.0, 118.0]]))
    return h


def test_histogram_series_are_shares_of_their_own_images(histogram):
    for curve in (histogram.ok_curve, histogram.inspected_curve):
        assert curve.getData()[1].sum() == pytest.approx(1.0)
    # 40 calibration images are as tall as 2002 inspected ones
    ok_top, seen_top = histogram.ok_curve.getData()[1].max(), histogram.inspected_curve.getData()[1].max()
    assert 0.5 < ok_top / seen_top < 2.0
    assert histogram.plot.getAxis("left").labelText == "share of images"


def _view_rects(h, qtbot):
    qtbot.wait(30)
    vb, label, legend = h.plot.getViewBox(), h.line.label, h.plot.getPlotItem().legend
    return (vb.boundingRect(), label.mapRectToItem(vb, label.boundingRect()),
            legend.mapRectToItem(vb, legend.boundingRect()))


@pytest.mark.parametrize("where", ["max", "min", "beyond", "middle"])
def test_histogram_threshold_label_stays_inside_and_off_the_legend(histogram, qtbot, where):
    h = histogram
    (x0, x1), _ = h.plot.getViewBox().viewRange()
    value = {"max": 118.0, "min": float(h._ok.min()), "beyond": 300.0, "middle": x0 + 0.49 * (x1 - x0)}[where]
    h.set_threshold(value)
    view, label, legend = _view_rects(h, qtbot)
    assert view.contains(label), (view, label)
    assert not label.intersects(legend)
    if where == "middle":  # room on the left of the line: the label stays at the top
        assert label.top() < legend.bottom()
    assert f"{value:.2f}" in h.line.label.toPlainText()
    (x0, x1), _ = h.plot.getViewBox().viewRange()
    assert x0 < value < x1 and x1 > 118.0  # the scores and the threshold, with a margin
    legend_item = h.plot.getPlotItem().legend
    assert legend_item.zValue() > h.plot.getViewBox().childGroup.zValue()  # drawn above the bars
    assert 0 < legend_item.opts["brush"].color().alpha() < 255


# -- results ------------------------------------------------------------------------------------
def _results(qtbot, names_verdicts):
    p = ResultsPanel()
    qtbot.addWidget(p)
    thumb = np.zeros((48, 48, 3), np.uint8)
    for rid, (name, verdict) in enumerate(names_verdicts, start=1):
        p.add_result(rid, name, float(rid), verdict, 0.03, thumb)
    return p


def test_results_rows_are_compact_with_elided_names(qtbot):
    long = "/data/line3/2026-12-01/shift-a/camera-2/" + "very_long_part_name_" * 4 + "0001.png"
    p = _results(qtbot, [(long, "OK")] + [(f"cell{i:04d}.png", "OK") for i in range(30)])
    p.resize(420, 300)
    p.show()
    qtbot.waitExposed(p)
    p.table.scrollToTop()
    assert p.table.rowHeight(0) <= 30
    assert not p.table.wordWrap() and p.table.textElideMode() != p.table.textElideMode().ElideNone
    assert p.table.item(0, 1).toolTip() == long
    viewport = p.table.viewport().height()
    assert p.table.rowAt(viewport - 1) - p.table.rowAt(0) + 1 >= 7  # not three


def test_results_filter_hides_rows_and_next_walks_the_visible_ones(qtbot):
    p = _results(qtbot, [("a.png", "OK"), ("b.png", "NG"), ("c_side.png", "OK"), ("d.png", "NG")])
    p.set_verdicts({1: "NG", 3: "OK"}, changed_from={1: "OK"})
    assert p.table.item(0, 3).text() == "OK → NG"
    p.filter_combo.setCurrentText("NG only")
    assert p.row_count() == 4 and p.visible_count() == 3  # hidden, not deleted
    ids = []
    p.result_selected.connect(ids.append)
    for _ in range(4):
        p.select_next()
    assert ids == [1, 2, 4] and p.selected_id() == 4
    p.filter_combo.setCurrentText("Changed by a label")
    assert [p.table.item(r, 1).text() for r in p.visible_rows()] == ["a.png"]
    p.filter_combo.setCurrentText("All")
    qtbot.keyClicks(p.name_filter, "SIDE")
    assert p.visible_rows() == [2]
    p.add_result(5, "e.png", 5.0, "NG", 0.01)  # a live row that does not match stays hidden
    assert p.visible_rows() == [2] and p.row_count() == 5
    p.set_filter("All", "")
    assert p.visible_count() == 5
    p.keep_only({2, 5})  # the others left the session's table
    assert [p.table.item(r, 1).text() for r in range(p.row_count())] == ["b.png", "e.png"]
    p.clear()
    assert p.row_count() == 0


# -- inspection view ----------------------------------------------------------------------------
@pytest.fixture
def view(qtbot):
    v = InspectionView()
    qtbot.addWidget(v)
    v.resize(700, 700)
    v.show()
    qtbot.waitExposed(v)
    return v


def test_full_heat_map_shows_the_whole_map(view, qtbot):
    amap = np.full((50, 50), 0.5, np.float32)
    amap[10:20, 10:20] = 2.0  # nothing reaches the pixel threshold
    view.set_image(np.zeros((200, 200, 3), np.uint8), "part")
    view.set_pixel_threshold(3.0, 6.0)
    view.set_anomaly_map(amap)
    assert tuple(view.heat.levels) == (3.0, 6.0)
    with qtbot.waitSignal(view.full_heatmap_toggled) as blocker:
        view.full_heat_check.click()
    assert blocker.args == [True] and view.full_heatmap
    assert view.heat.lut[1][3] < 60  # the cool end of the whole map fades in, it does not tint the part
    assert tuple(view.heat.levels) == (0.5, 6.0)  # the map's minimum up to vmax
    view.set_pixel_threshold(4.0, None)
    assert tuple(view.heat.levels) == (0.5, 6.0)
    with qtbot.waitSignal(view.full_heatmap_toggled) as blocker:
        view.set_full_heatmap(False)
    assert blocker.args == [False] and tuple(view.heat.levels) == (4.0, 6.0)


def test_note_under_the_verdict_is_shown_and_cleared(view):
    view.set_verdict("NG", 41.0, 40.0)
    note = "NG by image score; no pixel above the pixel threshold — the hottest area is outlined"
    view.set_note(note)
    assert view.note_label.isVisible() and view.note_text == note
    view.set_note("")
    assert not view.note_label.isVisible()
    view.set_note(note)
    view.clear()
    assert view.note_text == "" and not view.note_label.isVisible()


def _zoom_in(view):
    view.viewbox.setRange(QRectF(10, 10, 20, 20), padding=0)
    (x0, x1), _ = view.viewbox.viewRange()
    assert x1 - x0 < 100


def _shows_whole(view, w, h):
    (x0, x1), (y0, y1) = view.viewbox.viewRange()
    return x0 <= 0 and x1 >= w and y0 <= 0 and y1 >= h


def test_next_image_resets_the_zoom_unless_keep_zoom(view):
    rng = np.random.default_rng(1)
    first, second, third = (rng.integers(0, 255, (300, 200, 3), np.uint8) for _ in range(3))
    view.set_image(first, "a.png")
    _zoom_in(view)
    view.set_image(first, "a.png")  # the same image re-shown (a threshold moved): zoom stays
    assert not _shows_whole(view, 200, 300)
    view.set_image(second, "b.png")  # the next part, same size
    assert _shows_whole(view, 200, 300)
    view.set_image(second.copy(), "b.png", key=7)
    _zoom_in(view)
    view.set_image(third, "b.png", key=7)  # same key: the same result (re-read pixels may differ)
    assert not _shows_whole(view, 200, 300)
    view.keep_zoom_check.setChecked(True)
    view.set_image(first, "c.png", key=8)
    assert not _shows_whole(view, 200, 300) and view.keep_zoom


def test_show_waiting_drops_the_previous_result(view):
    view.set_image(np.full((100, 100, 3), 200, np.uint8), "old.png")
    view.set_anomaly_map(np.ones((10, 10), np.float32))
    view.set_regions([np.array([[1, 1], [5, 1], [5, 5]])])
    view.set_verdict("NG", 9.0, 5.0)
    view.set_note("an old note")
    view.show_waiting("Live: waiting for the first frame…")
    assert view.verdict_text == "—" and view.detail_label.text() == "Live: waiting for the first frame…"
    assert view.base.image is None and view.heat.image is None and view.outline_count == 0
    assert view.note_text == "" and view.name_label.text() == ""


def test_big_verdict_is_readable_across_the_room(view):
    view.set_verdict("NG", 9.0, 5.0)
    view.verdict_label.ensurePolished()
    assert view.verdict_label.fontInfo().pixelSize() >= 96
    assert view.verdict_label.height() >= 120
    view.set_verdict("?", 9.0, None)  # the long text still fits the width
    view.verdict_label.ensurePolished()
    width = view.verdict_label.fontMetrics().horizontalAdvance(view.verdict_text)
    assert width <= view.verdict_label.width()
