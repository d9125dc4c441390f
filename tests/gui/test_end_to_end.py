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
        c.new_recipe("ELPV e2e", ok_paths=split.ok_train[:12])
        with qtbot.waitSignal(c.model_changed, timeout=120_000):
            w.ok_panel.fit_button.click()
        assert w.threshold_panel.isEnabled()
        cells = [split.stream[0].path, next(x.path for x in split.stream if x.is_ng)]
        c.inspect_paths(cells)
        qtbot.waitUntil(lambda: len(c.results) == 2 and not runner.busy, timeout=60_000)
        qtbot.waitUntil(lambda: w.view.verdict_text in ("OK", "NG"), timeout=5000)
        shown = c.results[c.shown_id]
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
