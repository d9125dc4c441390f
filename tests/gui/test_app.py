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


def test_the_station_collects_garbage_on_the_ui_thread_never_in_a_worker(qtbot, monkeypatch):
    """A closed window in a reference cycle, collected by whichever thread allocates next, is
    a widget deleted off the UI thread: a crash. The station collects on a UI-thread timer."""
    import gc
    import threading

    from gui import app as app_module

    collected_in: list[str] = []

    class Cycle:
        def __del__(self):
            collected_in.append(threading.current_thread().name)

    gc.enable()  # a plain process (the GUI tests' fixture has it off)
    monkeypatch.setattr(app_module, "_garbage_collector", None)
    app_module.collect_garbage_on_ui_thread()
    try:
        assert not gc.isenabled()
        c = Cycle()
        c.me = c
        del c
        kept: list = []  # the worker's allocations stay alive: they count towards a collection
        worker = threading.Thread(target=lambda: kept.extend({} for _ in range(100_000)), name="worker")
        worker.start()
        worker.join()
        assert collected_in == []  # the worker's 100,000 allocations collected nothing
        qtbot.waitUntil(lambda: collected_in == [threading.current_thread().name], timeout=3000)
    finally:
        app_module._garbage_collector.timer.stop()
