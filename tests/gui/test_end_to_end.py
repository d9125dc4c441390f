"""End to end on real ELPV cells with the real Lite0 backbone and the real engine thread."""
import pytest
from PySide6.QtCore import QSettings

pytestmark = pytest.mark.slow


def test_fit_inspect_and_slider_changes_verdict(qtbot, tmp_path):
    from core.demo import demo_split
    from gui.controller import StationController
    from gui.main_window import MainWindow
    from gui.runner import EngineRunner

    split = demo_split()
    runner = EngineRunner()
    c = StationController(runner)
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    try:
        c.session.new_recipe("ELPV e2e", ok_paths=split.ok_train[:12])
        with qtbot.waitSignal(c.model_changed, timeout=120_000):
            w.ok_panel.fit_button.click()
        assert w.threshold_panel.isEnabled()
        cells = [split.stream[0].path, next(x.path for x in split.stream if x.is_ng)]
        c.session.inspect_paths(cells)
        qtbot.waitUntil(lambda: len(c.session.results) == 2 and not runner.busy, timeout=60_000)
        qtbot.waitUntil(lambda: w.view.verdict_text in ("OK", "NG"), timeout=5000)
        shown = c.session.results.get(c.session.shown_id)
        slider = w.threshold_panel.image_row
        # threshold above the shown score -> OK; below -> NG, re-judged without the model
        slider.set_range(0.0, shown.score * 2)
        slider.slider.setValue(slider.slider.maximum())
        qtbot.waitUntil(lambda: w.view.verdict_text == "OK", timeout=5000)
        slider.slider.setValue(0)
        qtbot.waitUntil(lambda: w.view.verdict_text == "NG", timeout=5000)
        assert w.results_panel.table.item(1, 3).text() == "NG"
    finally:
        assert runner.shutdown(10_000)


def test_click_region_mark_false_alarm_score_falls(qtbot, tmp_path):
    """Issue 4: click a highlighted region, mark it 'false alarm', its score falls on re-inspection."""
    import numpy as np
    from PySide6.QtCore import QPointF, Qt

    from core import find_regions
    from core.demo import demo_split
    from core.labels import LabelStore
    from gui.controller import StationController
    from gui.main_window import MainWindow
    from gui.runner import EngineRunner

    split = demo_split()
    runner = EngineRunner()
    c = StationController(runner, labels_dir=tmp_path / "labels")
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    try:
        c.session.new_recipe("ELPV e2e labels", ok_paths=split.ok_train[:12])
        c.session.operator = "e2e"
        with qtbot.waitSignal(c.model_changed, timeout=120_000):
            c.session.start_fit()
        ng = next(x.path for x in split.stream if x.is_ng)
        c.session.inspect_paths([ng])
        qtbot.waitUntil(lambda: len(c.session.results) == 1 and not runner.busy, timeout=60_000)
        rec = c.session.results.get(c.session.shown_id)
        c.session.set_thresholds(c.session.image_threshold, float(np.percentile(rec.anomaly_map, 97)))
        qtbot.waitUntil(lambda: w.view.outline_count >= 1, timeout=5000)
        region = find_regions(rec.anomaly_map, c.session.pixel_threshold)[0]
        row, col = np.unravel_index(np.argmax(np.where(region.mask, rec.anomaly_map, -np.inf)), region.mask.shape)
        region_before, score_before = float(rec.anomaly_map[region.mask].max()), rec.score
        # a real mouse click on that map pixel
        scene = w.view.heat.mapToScene(QPointF(col + 0.5, row + 0.5))
        pos = w.view.graphics.mapFromScene(scene)
        qtbot.mouseClick(w.view.graphics.viewport(), Qt.MouseButton.LeftButton, pos=pos)
        qtbot.waitUntil(lambda: getattr(w, "label_menu", None) is not None and w.label_menu.isVisible(), timeout=5000)
        with qtbot.waitSignal(c.label_saved, timeout=60_000):
            w.label_menu.actions()[0].trigger()  # "False alarm (this is fine)"
        qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
        assert float(rec.anomaly_map[region.mask].max()) < region_before
        assert rec.score < score_before
        assert w.labels_panel.table.rowCount() == 1
        with LabelStore(c.session.labels.store_path) as fresh:
            assert [lab.kind for lab in fresh.labels()] == ["false_alarm"]
    finally:
        assert runner.shutdown(10_000)
