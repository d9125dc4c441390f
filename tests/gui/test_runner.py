"""The real EngineRunner: a job in another thread, cancellation, failure, shutdown."""
import threading

import pytest

from core.jobs import JobCallbacks, Progress
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


class Recorder:
    """Per-job callbacks that remember what they were given."""

    def __init__(self):
        self.returned, self.failed, self.cancelled, self.items = [], [], [], []

    def callbacks(self):
        return JobCallbacks(on_returned=self.returned.append, on_failed=self.failed.append,
                            on_cancelled=lambda: self.cancelled.append(True), on_item=self.items.append)


def test_returns_value_from_worker_thread_to_its_own_callback(qtbot, runner):
    progress = []
    runner.progress.connect(lambda p: progress.append(p.done))
    rec = Recorder()
    with qtbot.waitSignal(runner.busy_changed):
        runner.submit(finite_job, rec.callbacks())
    qtbot.waitUntil(lambda: rec.returned == ["done"], timeout=5000)
    qtbot.waitUntil(lambda: not runner.busy)
    assert progress == [1, 2, 3] and not rec.failed and not rec.cancelled


def test_cancel_stops_endless_job(qtbot, runner):
    threads = set()
    rec = Recorder()
    with qtbot.waitSignal(runner.started, timeout=5000):
        runner.submit(lambda token: endless_job(token, threads), rec.callbacks())
    qtbot.waitUntil(lambda: len(rec.items) > 3, timeout=5000)
    assert runner.busy
    runner.cancel()
    qtbot.waitUntil(lambda: rec.cancelled == [True], timeout=5000)
    qtbot.waitUntil(lambda: not runner.busy, timeout=5000)
    assert threading.get_ident() not in threads  # ran in the engine thread
    assert not rec.returned and not rec.failed


def test_replace_cancels_running_job_and_runs_next(qtbot, runner):
    threads = set()
    first, second = Recorder(), Recorder()
    runner.submit(lambda token: endless_job(token, threads), first.callbacks())
    qtbot.waitUntil(lambda: len(first.items) > 0, timeout=5000)
    runner.submit(finite_job, second.callbacks(), replace=True)
    qtbot.waitUntil(lambda: second.returned == ["done"], timeout=5000)
    assert first.cancelled == [True] and not first.returned and not second.cancelled


def test_failure_is_reported_to_the_failing_job_only(qtbot, runner):
    bad, good = Recorder(), Recorder()
    runner.submit(failing_job, bad.callbacks())
    runner.submit(finite_job, good.callbacks())
    qtbot.waitUntil(lambda: good.returned == ["done"], timeout=5000)
    assert len(bad.failed) == 1 and isinstance(bad.failed[0], ValueError) and not good.failed
    qtbot.waitUntil(lambda: not runner.busy)


def test_a_callback_may_submit_the_next_job(qtbot, runner):
    """A job's last callback runs after it left the queue, so chaining jobs keeps `busy` true."""
    second = Recorder()
    busy = []
    runner.busy_changed.connect(busy.append)
    runner.submit(finite_job, JobCallbacks(on_returned=lambda _v: runner.submit(finite_job, second.callbacks())))
    qtbot.waitUntil(lambda: second.returned == ["done"], timeout=5000)
    qtbot.waitUntil(lambda: not runner.busy)
    assert busy[0] is True and busy[-1] is False


def test_shutdown_while_running_cancels_and_ends_thread(qtbot):
    r = EngineRunner()
    threads = set()
    rec = Recorder()
    r.submit(lambda token: endless_job(token, threads), rec.callbacks())
    qtbot.waitUntil(lambda: len(rec.items) > 0, timeout=5000)
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
    c.session.new_recipe("closing", tiny_config, [str(p) for p in ok_images])
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    return runner, c, w


def test_closing_the_window_during_a_fit_ends_the_engine_thread_and_keeps_the_old_model(qtbot, live_window):
    runner, c, w = live_window
    progress = []
    c.progress.connect(lambda *a: progress.append(a))
    c.session.start_fit()
    qtbot.waitUntil(lambda: len(progress) > 0, timeout=10000)  # the fit is under way
    w.close()
    assert not runner.thread.isRunning()
    assert c.session.detector is None  # the unfinished fit never replaced the (absent) model


def test_closing_the_window_during_an_inspection_or_a_save_ends_cleanly(qtbot, tmp_path, ok_images, live_window):
    from core import load_detector

    runner, c, w = live_window
    with qtbot.waitSignal(c.model_changed, timeout=60000):
        c.session.start_fit()
    recipe = tmp_path / "closing.okrecipe"
    c.session.save_recipe(str(recipe))  # the model save runs on the engine thread, before the inspection
    # saved (the save job reports progress too: closing before it ends asks about unsaved changes)
    qtbot.waitUntil(lambda: not c.session.dirty, timeout=60000)
    progress = []
    c.progress.connect(lambda *a: progress.append(a))
    c.session.inspect_paths([str(p) for p in ok_images] * 20)
    qtbot.waitUntil(lambda: len(progress) > 0, timeout=10000)
    w.close()
    assert not runner.thread.isRunning()
    model = recipe.with_suffix(".okng")
    assert model.exists() and load_detector(model).model.n_samples > 0  # whole and loadable
