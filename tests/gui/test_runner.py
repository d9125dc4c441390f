"""The real EngineRunner: a job in another thread, cancellation, failure, shutdown."""
import threading

import pytest

from core.jobs import Progress
from gui.runner import EngineRunner


@pytest.fixture
def runner(qtbot):
    r = EngineRunner()
    yield r
    assert r.shutdown(5000)
    assert not r.thread.isRunning()


def endless_job(token, seen_threads):
    i = 0
    while True:
        seen_threads.add(threading.get_ident())
        token.raise_if_cancelled()
        i += 1
        yield Progress(i, 0, "tick", i)


def finite_job(token):
    for i in range(3):
        yield Progress(i + 1, 3, "step")
    return "done"


def failing_job(token):
    yield Progress(0, 1, "about to fail")
    raise ValueError("boom")


def test_returns_value_from_worker_thread(qtbot, runner):
    progress = []
    runner.progress.connect(lambda p: progress.append(p.done))
    with qtbot.waitSignal(runner.busy_changed) as busy:
        with qtbot.waitSignal(runner.returned, timeout=5000) as blocker:
            runner.submit(finite_job, tag="finite")
    assert blocker.args == ["done"]
    qtbot.waitUntil(lambda: not runner.busy)
    assert progress == [1, 2, 3]


def test_cancel_stops_endless_job(qtbot, runner):
    threads = set()
    items = []
    runner.yielded.connect(items.append)
    with qtbot.waitSignal(runner.started, timeout=5000):
        runner.submit(lambda token: endless_job(token, threads), tag="endless")
    qtbot.waitUntil(lambda: len(items) > 3, timeout=5000)
    assert runner.busy
    with qtbot.waitSignal(runner.cancelled, timeout=5000):
        runner.cancel()
    qtbot.waitUntil(lambda: not runner.busy, timeout=5000)
    assert threading.get_ident() not in threads  # ran in the engine thread


def test_replace_cancels_running_job_and_runs_next(qtbot, runner):
    threads = set()
    items = []
    runner.yielded.connect(items.append)
    runner.submit(lambda token: endless_job(token, threads))
    qtbot.waitUntil(lambda: len(items) > 0, timeout=5000)
    with qtbot.waitSignal(runner.cancelled, timeout=5000):
        with qtbot.waitSignal(runner.returned, timeout=5000) as blocker:
            runner.submit(finite_job, replace=True)
    assert blocker.args == ["done"]


def test_failure_is_reported(qtbot, runner):
    with qtbot.waitSignal(runner.failed, timeout=5000) as blocker:
        runner.submit(failing_job)
    assert isinstance(blocker.args[0], ValueError)
    qtbot.waitUntil(lambda: not runner.busy)


def test_shutdown_while_running_cancels_and_ends_thread(qtbot):
    r = EngineRunner()
    threads = set()
    items = []
    r.yielded.connect(items.append)
    r.submit(lambda token: endless_job(token, threads))
    qtbot.waitUntil(lambda: len(items) > 0, timeout=5000)
    assert r.shutdown(5000)
    assert not r.thread.isRunning()
    with pytest.raises(RuntimeError):
        r.submit(finite_job)


@pytest.fixture
def live_window(qtbot, tmp_path, ok_images, tiny_config):
    """The real main window on a real engine thread, with a tiny recipe: (runner, controller, window)."""
    from PySide6.QtCore import QSettings

    from gui.controller import StationController
    from gui.main_window import MainWindow

    runner = EngineRunner()
    c = StationController(runner)
    c.new_recipe("closing", tiny_config, [str(p) for p in ok_images])
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    return runner, c, w


def test_closing_the_window_during_a_fit_ends_the_engine_thread_and_keeps_the_old_model(qtbot, live_window):
    runner, c, w = live_window
    progress = []
    c.progress.connect(lambda *a: progress.append(a))
    c.start_fit()
    qtbot.waitUntil(lambda: len(progress) > 0, timeout=10000)  # the fit is under way
    w.close()
    assert not runner.thread.isRunning()
    assert c.detector is None  # the unfinished fit never replaced the (absent) model


def test_closing_the_window_during_an_inspection_or_a_save_ends_cleanly(qtbot, tmp_path, ok_images, live_window):
    from core import load_detector

    runner, c, w = live_window
    with qtbot.waitSignal(c.model_changed, timeout=60000):
        c.start_fit()
    recipe = tmp_path / "closing.okrecipe"
    c.save_recipe(str(recipe))  # the model save runs on the engine thread, before the inspection
    progress = []
    c.progress.connect(lambda *a: progress.append(a))
    c.inspect_paths([str(p) for p in ok_images] * 20)
    qtbot.waitUntil(lambda: len(progress) > 0, timeout=10000)
    w.close()
    assert not runner.thread.isRunning()
    model = recipe.with_suffix(".okng")
    assert model.exists() and load_detector(model).model.n_samples > 0  # whole and loadable
