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


def test_ready_file_says_the_demo_window_is_up(qtbot, monkeypatch, tmp_path):
    """OKNG_READY_FILE (the installer's smoke test): written once the window is shown."""
    import json
    import time

    from gui import app as app_module

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    ready = tmp_path / "ready.json"
    monkeypatch.setenv("OKNG_READY_FILE", str(ready))
    started = time.time()

    def fake_exec(self=None):
        windows = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        qtbot.waitUntil(ready.exists, timeout=5000)  # the timer fires from the event loop
        for w in windows:
            w.close()
        return 0

    monkeypatch.setattr(QApplication, "exec", fake_exec)
    assert app_module.run_gui(demo=True) == 0
    info = json.loads(ready.read_text())
    assert info["visible"] is True and info["title"] == "OK/NG Station — ELPV mono cells (demo)"
    assert info["ok_images"] == 200 and info["frozen"] is False
    assert started <= info["time"] <= time.time() and info["width"] > 0 and info["height"] > 0
