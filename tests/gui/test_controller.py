"""StationController with the inline SyncRunner and a small real (random-weight) detector."""
import numpy as np
import pytest
from PySide6.QtCore import QSettings

from gui.controller import StationController
from gui.runner import SyncRunner


@pytest.fixture
def controller(qtbot, ok_images, tiny_config):
    c = StationController(SyncRunner())
    c.session.new_recipe("synthetic", tiny_config)
    c.session.add_ok_paths([str(__import__("pathlib").Path(ok_images[0]).parent)])  # a folder expands
    return c


def test_fit_inspect_and_rejudge_without_rerunning(qtbot, controller, defect_image, ok_images, monkeypatch):
    c = controller
    assert len(c.session.ok_paths) == 8
    errors = []
    c.error.connect(errors.append)
    with qtbot.waitSignal(c.model_changed):
        c.session.start_fit()
    assert c.session.detector is not None and c.session.image_threshold is not None
    assert c.session.calibration_scores().size == 2  # 20 % of 8 held out
    with qtbot.waitSignal(c.display_changed, timeout=5000) as shown:
        c.session.inspect_paths([defect_image, ok_images[0]])
    assert len(c.session.results) == 2 and not errors
    d = shown.args[0]
    assert d.image.shape == (64, 64, 3) and d.anomaly_map.shape == (64, 64)
    defect = next(r for r in c.session.results if r.name == "defect.png")
    # threshold just below / above the defect score flips its verdict; the model is not called
    monkeypatch.setattr(c.session.detector, "inspect", lambda *a: pytest.fail("model re-run"))
    monkeypatch.setattr(c.session.detector, "embed", lambda *a: pytest.fail("model re-run"))
    with qtbot.waitSignal(c.results_changed):
        c.session.set_thresholds(defect.score - 1e-3, c.session.pixel_threshold)
    assert defect.verdict == "NG"
    c.session.set_thresholds(defect.score + 1e-3, c.session.pixel_threshold)
    assert defect.verdict == "OK"
    assert c.session.detector.thresholds.image == pytest.approx(defect.score + 1e-3)
    # pixel threshold below the map max gives region outlines for the shown image
    c.session.show_result(defect.id)
    c.session.set_thresholds(c.session.image_threshold, float(np.percentile(defect.anomaly_map, 90)))
    qtbot.waitUntil(lambda: c.session.display() is not None and len(c.session.display().contours) >= 1)


def test_errors_are_reported_not_swallowed(qtbot, controller, tmp_path):
    c = controller
    with qtbot.waitSignal(c.error) as err:
        c.session.inspect_paths([str(tmp_path)])  # no model yet
    assert "fit" in err.args[0].lower()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    c.session.add_ok_paths([str(bad)])
    messages = []
    c.error.connect(messages.append)
    with qtbot.waitSignal(c.model_changed):
        c.session.start_fit()
    assert any("broken.png" in m for m in messages)


def test_recipe_save_and_open_restore_model_and_thresholds(qtbot, controller, tmp_path):
    c = controller
    c.session.start_fit()
    c.session.set_thresholds(c.session.image_threshold * 1.5, c.session.pixel_threshold * 1.25)
    saved = (c.session.image_threshold, c.session.pixel_threshold)
    path = tmp_path / "synthetic.okrecipe"
    assert c.session.save_recipe(path)
    assert path.is_file() and path.with_suffix(".okng").is_file()
    c2 = StationController(SyncRunner())
    names = []
    c2.recipe_changed.connect(names.append)
    with qtbot.waitSignal(c2.model_changed):
        c2.session.open_recipe(path)
    assert names[-1] == "synthetic" and c2.session.ok_paths == c.session.ok_paths
    assert (c2.session.image_threshold, c2.session.pixel_threshold) == pytest.approx(saved)
    with qtbot.waitSignal(c2.error):
        c2.session.open_recipe(tmp_path / "missing.okrecipe")


def test_main_window_smoke(qtbot, controller, tmp_path):
    from gui.main_window import MainWindow

    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(controller, settings)
    qtbot.addWidget(w)
    w.show()
    assert w.windowTitle() == "OK/NG Station — synthetic *"  # OK images added, not saved yet
    assert w.ok_panel.list.count() == 8
    controller.error.emit("something failed")
    assert w.error_banner.isVisible() and "something failed" in w.error_label.text()
    controller.session.mark_saved()  # unsaved work is asked about: tests/gui/test_operator_station.py
    w.close()
    assert settings.value("window/geometry") is not None


def test_live_video_shows_latest_result(qtbot, controller, tmp_path):
    import cv2

    c = controller
    c.session.start_fit()
    video = tmp_path / "line.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for i in range(4):
        w.write(np.full((64, 64, 3), 100 + 10 * i, np.uint8))
    w.release()
    shown = []
    c.display_changed.connect(shown.append)
    live = []
    c.live_changed.connect(live.append)
    c.session.start_live("video", str(video))  # SyncRunner: runs to the end of the file inline
    assert len(c.session.results) == 4 and live == [True, False]
    qtbot.waitUntil(lambda: len(shown) >= 1)
    assert len(shown) == 1  # four results during one event-loop turn -> one render, the newest
    assert shown[0].name == list(c.session.results)[-1].name


def _write_video(path, n, size=64):
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    for i in range(n):
        w.write(np.full((size, size, 3), 100 + 10 * i, np.uint8))
    w.release()


def test_capture_ok_frames_from_video(qtbot, controller, tmp_path):
    c = controller
    c.session.captures_dir = tmp_path / "appdata" / "captures"
    video = tmp_path / "cam.avi"
    _write_video(video, 6)
    before = len(c.session.ok_paths)
    errors = []
    c.error.connect(errors.append)
    with qtbot.waitSignal(c.ok_paths_changed) as changed:
        c.session.capture_ok("video", str(video), 3)  # SyncRunner: runs inline
    assert not errors
    folder = tmp_path / "appdata" / "captures" / "synthetic"  # unsaved recipe -> app-data folder
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 3 and not list(folder.glob(".*"))  # no temporary files left
    assert len(c.session.ok_paths) == before + 3 and changed.args[0][-3:] == [str(p) for p in pngs]
    import cv2
    assert cv2.imread(str(pngs[0])).shape == (64, 64, 3)
    # a saved recipe captures beside itself
    c.session.recipe_path = tmp_path / "line" / "synthetic.okrecipe"
    assert c.session.capture_folder() == tmp_path / "line" / "synthetic.captures"


def test_capture_from_missing_camera_is_a_clear_error(qtbot, controller):
    c = controller
    before = len(c.session.ok_paths)
    with qtbot.waitSignal(c.error) as err:
        c.session.capture_ok("camera", "97", 1)
    assert "cannot open camera 97" in err.args[0] and len(c.session.ok_paths) == before
    with qtbot.waitSignal(c.error):
        c.session.capture_ok("folder", "/tmp", 1)


@pytest.mark.parametrize("name", ["patchcore", "padim-lowrank"])
def test_a_model_chosen_in_the_gui_is_the_one_fitted(qtbot, controller, name):
    c = controller
    names = [n for n, _ in c.session.available_models()]
    assert names[0] == "padim" and name in names
    c.session.set_model(name)
    with qtbot.waitSignal(c.model_changed, timeout=60000):
        c.session.start_fit()
    assert c.session.detector.model.kind == name


def test_a_controller_without_a_labels_folder_keeps_its_data_out_of_the_users_folder():
    from pathlib import Path

    from gui.controller import _app_data

    assert not _app_data("labels").is_relative_to(Path.home() / ".local" / "share")
