"""The window serves a PLC: one engine (the window's model and thresholds), the link state on
screen, the results in the recipe's log."""
from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("asyncua")
pytest.importorskip("pymodbus")

from pymodbus.client import ModbusTcpClient  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from core.imageio import load_image  # noqa: E402
from core.line.broker import free_port  # noqa: E402
from core.line.store import LineLog  # noqa: E402
from gui.controller import StationController  # noqa: E402
from gui.main_window import MainWindow  # noqa: E402
from gui.runner import SyncRunner  # noqa: E402


@pytest.fixture
def window(qtbot, tmp_path, ok_images, tiny_config):
    c = StationController(SyncRunner(), labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    c.session.new_recipe("synthetic", tiny_config, list(ok_images))
    w = MainWindow(c, QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    yield w
    w.line_link.stop()


def _cycle(qtbot, plc: ModbusTcpClient, part: int, image: str, inbox) -> list[bool]:
    assert not plc.write_registers(4, [0, part]).isError()
    assert not plc.write_coil(0, True).isError()
    # the camera's image lands in the watched folder whole (written aside, then renamed)
    shutil.copy(image, inbox / f"part{part}.png.part")
    os.replace(inbox / f"part{part}.png.part", inbox / f"part{part}.png")
    qtbot.waitUntil(lambda: plc.read_coils(4, count=1).bits[0], timeout=20000)
    bits = plc.read_coils(0, count=7).bits
    regs = plc.read_holding_registers(3, count=1).registers + plc.read_holding_registers(10, count=32).registers
    text = b"".join(r.to_bytes(2, "big") for r in regs[1:]).rstrip(b"\0").decode("ascii", "replace")
    assert regs[0] == 0, f"part {part}: ErrorCode {regs[0]}: {text}"
    assert plc.read_holding_registers(4, count=2).registers == [0, part]
    assert not plc.write_coil(1, True).isError()
    qtbot.waitUntil(lambda: plc.read_coils(2, count=1).bits[0], timeout=10000)
    return bits


def test_the_window_serves_a_plc_with_its_own_model_and_shows_the_link(qtbot, window, tmp_path, defect_image):
    w, s = window, window.controller.session
    s.start_fit()
    assert s.detector is not None and s.detector.thresholds is not None
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    w.source_panel.set_live_target("folder", str(inbox))
    port = free_port()
    s.recipe.station.update(line_modbus=f"127.0.0.1:{port}", line_opcua=f"127.0.0.1:{free_port()}")
    with qtbot.waitSignal(w.line_link.started, timeout=60000) as started:
        w.link_panel.button.click()
    assert started.args == [True] and w.link_panel.button.text() == "Stop serving the line"
    plc = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
    assert plc.connect()
    try:
        expected = s.detector.inspect([load_image(defect_image)])[0].verdict
        bits = _cycle(qtbot, plc, 77, defect_image, inbox)
        assert (bits[5], bits[6]) == (expected == "OK", expected == "NG")
        qtbot.waitUntil(lambda: "Last result: part 77" in w.link_panel.state_label.text(), timeout=5000)
        text = w.link_panel.state_label.text()
        assert "1 PLC connected" in text and expected in text and "Last trigger" in text
        # one engine: a threshold set in the window judges the next part
        s.set_thresholds(1e9, s.pixel_threshold)
        bits = _cycle(qtbot, plc, 78, defect_image, inbox)
        assert (bits[5], bits[6]) == (True, False)
    finally:
        plc.close()
    log = LineLog(s.shift.path)
    try:
        cycles = log.cycles()
    finally:
        log.close()
    assert [(c.part_id, c.verdict, c.acked_at is not None) for c in cycles] == [(77, expected, True), (78, "OK", True)]
    qtbot.waitUntil(lambda: w.shift_panel.values["total"].text() == "2", timeout=5000)  # the shift counts them
    w.link_panel.button.click()  # stop
    assert not w.line_link.serving and "Not serving" in w.link_panel.state_label.text()
    text = w.link_panel.state_label.text()  # the night is still told the next morning
    assert "Last served until " in text and ": 2 cycles, 0 triggers refused; last result part 78 OK" in text


def test_serving_without_an_image_source_says_what_is_missing(qtbot, window):
    w = window
    w.source_panel.set_live_target("folder", "")
    with qtbot.waitSignal(w.line_link.started, timeout=10000) as started:
        w.link_panel.button.click()
    assert started.args == [False] and not w.line_link.serving
    assert w.error_banner.isVisible() and "live source" in w.error_label.text()
    assert w.link_panel.button.isEnabled() and w.link_panel.button.text() == "Serve the line"


def test_on_first_start_inspect_shift_and_line_share_one_tab_group_with_inspect_shown(window):
    """Found trying the station: the Shift counters sat behind a raised Line tab, apart from
    the Inspect dock they were meant to share a tab group with."""
    from PySide6.QtWidgets import QDockWidget

    dock = {name: window.findChild(QDockWidget, name) for name in ("Inspect", "Shift", "Line", "Messages")}
    assert set(window.tabifiedDockWidgets(dock["Inspect"])) == {dock["Shift"], dock["Line"], dock["Messages"]}
    assert not dock["Inspect"].visibleRegion().isEmpty()
    assert all(dock[name].visibleRegion().isEmpty() for name in ("Shift", "Line", "Messages"))


def test_a_live_source_set_for_the_line_comes_before_the_demo_stream(window, tmp_path, ok_images):
    """Found trying the station: a demo recipe made into another product's, with a folder set as
    the live source, fed the PLC the ELPV demo cells."""
    from core.line.sources import LiveGrab, Playlist

    w, s = window, window.controller.session
    s.demo_stream = list(ok_images[:3])  # as the demo leaves it
    assert isinstance(w.line_link._source(), Playlist)  # no live source: the demo stream is played
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    w.source_panel.set_live_target("folder", str(inbox))
    source = w.line_link._source()
    try:
        assert isinstance(source, LiveGrab)
    finally:
        source.close()


def test_images_the_line_skipped_are_said_in_the_messages_tab_and_the_line_dock(qtbot, window):
    """Images skipped as another part's went to the log only: the operator at the window never
    learnt that an image was set aside."""
    w = window

    class Serving:  # the service's status as the line thread leaves it
        skipped, total = [], 0

        def status(self):
            return {"links": [], "cycles": 0, "refused": 0, "last_trigger_age": None, "last_result": None,
                    "mqtt": [], "skipped": list(self.skipped), "skipped_total": self.total}

    w.line_link.service = Serving()
    try:
        w.line_link._tick()
        assert not any("skipped" in m for m in w.messages_panel.messages())
        Serving.skipped, Serving.total = ["/line/in/p46b.png"], 1
        w.line_link._tick()
        w.line_link._tick()  # said once
        said = [m for m in w.messages_panel.messages() if "skipped" in m]
        assert len(said) == 1 and "Line: skipped p46b.png: appeared while the previous part waited" in said[0]
        assert "1 image(s) skipped" in w.link_panel.state_label.text() and "p46b.png" in w.link_panel.state_label.text()
    finally:
        w.line_link.service = None
