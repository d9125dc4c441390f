"""The station's entry point: `okng demo` / `okng gui RECIPE` build a working window."""
from __future__ import annotations

from PySide6.QtWidgets import QApplication

from gui.main_window import MainWindow


def test_run_gui_opens_the_demo_and_closes_cleanly(qtbot, monkeypatch, tmp_path):
    from gui import app as app_module

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # QSettings of this test only
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    seen = {}

    def fake_exec(self=None):
        windows = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        seen["titles"] = [w.windowTitle() for w in windows]
        seen["ok"] = [w.ok_panel.list.count() for w in windows]
        for w in windows:
            w.close()  # the engine thread must end before the test does
        return 0

    monkeypatch.setattr(QApplication, "exec", fake_exec)
    assert app_module.run_gui(demo=True) == 0
    assert seen["titles"] == ["OK/NG Station — ELPV mono cells (demo)"] and seen["ok"] == [200]
