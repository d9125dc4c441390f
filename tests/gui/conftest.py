import gc
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import gui  # noqa: E402,F401  (applies the PySide6 6.12 emit() workaround first)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def ok_images(tmp_path):
    """8 synthetic 'OK' parts: a textured grey square, small random variations."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "ok"
    folder.mkdir()
    paths = []
    for i in range(8):
        img = np.full((64, 64, 3), 120, np.uint8)
        img[::8] = 160
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        p = folder / f"ok_{i}.png"
        cv2.imwrite(str(p), img)
        paths.append(str(p))
    return paths


@pytest.fixture
def defect_image(tmp_path):
    img = np.full((64, 64, 3), 120, np.uint8)
    img[::8] = 160
    cv2.circle(img, (40, 20), 9, (255, 255, 255), -1)
    p = tmp_path / "defect.png"
    cv2.imwrite(str(p), img)
    return str(p)


@pytest.fixture
def tiny_config():
    from core import DetectorConfig

    return DetectorConfig(weights="random", image_size=64, n_channels=20, batch_size=4)




@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item):
    """The test is over: pytest-qt closes its windows next, and a window with unsaved work
    would stop at "Save changes?" with nobody to answer. Tests of that prompt answer it
    themselves, inside the test."""
    from PySide6.QtWidgets import QApplication

    from gui.main_window import MainWindow

    for w in QApplication.topLevelWidgets():
        if isinstance(w, MainWindow):
            w.controller.session.mark_saved()
    return (yield)


@pytest.fixture(autouse=True)
def garbage_collected_on_the_test_thread():
    """As in the station (gui.app.collect_garbage_on_ui_thread): no automatic cycle
    collection while a GUI test runs, whose line link, engine or source threads could
    otherwise collect an earlier test's closed window off the UI thread (a segfault in CI);
    collected here instead, on the test's own thread, before and after (after pytest-qt has
    closed the test's widgets)."""
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        gc.collect()
        gc.enable()


@pytest.fixture(autouse=True)
def station_data_in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """A controller built without ``labels_dir`` keeps its label stores and results in the
    application data folder: in tests that is a temporary one, never the user's
    (~/.local/share/OKNG/...)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
