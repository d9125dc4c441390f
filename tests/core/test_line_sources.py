"""Which file a trigger takes from a watched folder: each part its own image, never a
neighbour's (found on a night shift: one late file put every later verdict one part off)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.line.handshake import LineError
from core.line.signals import ErrorCode
from core.line.sources import LiveGrab, Playlist
from core.sources import FolderWatchSource


def _png(value: int) -> bytes:
    ok, data = cv2.imencode(".png", np.full((48, 48, 3), value, np.uint8))
    return data.tobytes()


def _grab_value(grab: LiveGrab) -> int:
    return int(grab.grab().image[0, 0, 0])


@pytest.fixture
def inbox(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_each_trigger_takes_the_image_written_for_it(inbox):
    grab = LiveGrab(FolderWatchSource(inbox), timeout=2.0)
    grab.open()
    for value in (10, 20, 30):
        threading.Timer(0.05, lambda v=value: (inbox / f"p{v}.png").write_bytes(_png(v))).start()
        assert _grab_value(grab) == value


def test_an_image_written_before_the_trigger_but_after_the_last_part_is_this_parts(inbox):
    """A camera quicker than the PLC's trigger: the file is already there when the trigger comes."""
    grab = LiveGrab(FolderWatchSource(inbox), timeout=2.0)
    grab.open()
    threading.Timer(0.05, lambda: (inbox / "a.png").write_bytes(_png(10))).start()
    assert _grab_value(grab) == 10
    (inbox / "b.png").write_bytes(_png(20))
    time.sleep(0.05)
    assert _grab_value(grab) == 20


def test_a_file_that_lands_after_its_part_timed_out_is_not_the_next_parts_image(inbox):
    grab = LiveGrab(FolderWatchSource(inbox), timeout=0.3)
    grab.open()
    late = inbox / "p301.png"
    threading.Timer(0.05, lambda: late.write_bytes(b"")).start()  # the camera opens the file while the part waits
    with pytest.raises(LineError) as failed:
        grab.grab()
    assert failed.value.code == ErrorCode.NO_IMAGE and "p301.png was still being written" in str(failed.value)
    assert failed.value.image_path.endswith("p301.png")  # logged as the part's image
    late.write_bytes(_png(99))  # ... and finished it after the part's time-out
    threading.Timer(0.1, lambda: (inbox / "p302.png").write_bytes(_png(20))).start()
    assert _grab_value(grab) == 20  # part 302 is judged on its own image


def test_a_second_frame_for_one_trigger_is_skipped_not_given_to_the_next_part(inbox, caplog):
    grab = LiveGrab(FolderWatchSource(inbox), timeout=2.0)
    grab.open()
    def fire_twice():  # the camera fired twice for the trigger the station waits on
        (inbox / "p46.png").write_bytes(_png(46))
        (inbox / "p46b.png").write_bytes(_png(47))
    threading.Timer(0.05, fire_twice).start()
    assert _grab_value(grab) == 46
    threading.Timer(0.1, lambda: (inbox / "p47.png").write_bytes(_png(70))).start()
    assert _grab_value(grab) == 70
    assert "skipped p46b.png" in caplog.text and [Path(p).name for p in grab.skipped] == ["p46b.png"]


def test_images_that_arrived_between_triggers_are_taken_in_order_none_skipped(inbox):
    """A station running behind, or a camera a cycle ahead: the images wait, one per trigger."""
    grab = LiveGrab(FolderWatchSource(inbox), timeout=2.0)
    grab.open()
    threading.Timer(0.05, lambda: (inbox / "p1.png").write_bytes(_png(10))).start()
    assert _grab_value(grab) == 10
    for name, value in (("p2.png", 20), ("p3.png", 30), ("p4.png", 40)):  # while part 1 is judged
        (inbox / name).write_bytes(_png(value))
        time.sleep(0.02)
    assert [_grab_value(grab) for _ in range(3)] == [20, 30, 40] and grab.skipped == []
    assert grab.out_of_step == 2  # three, then two images waited at one trigger: said, none guessed away


def test_an_unreadable_image_is_named_reason_first_and_logged_by_its_path(inbox):
    """A Modbus error string keeps 64 characters: the reason comes before the file's name."""
    grab = LiveGrab(FolderWatchSource(inbox, settle_s=0.0), timeout=2.0)
    grab.open()
    (inbox / "part_0016.png").write_bytes(b"this is no picture at all")
    with pytest.raises(LineError) as failed:
        grab.grab()
    assert str(failed.value).startswith("image unreadable (not a readable image")
    assert str(failed.value).endswith(": part_0016.png") and failed.value.image_path.endswith("part_0016.png")


def test_the_models_bit_depth_reaches_the_files_a_trigger_reads(inbox, tmp_path):
    img = np.full((32, 32), 2000, np.uint16)  # 12-bit data in a 16-bit file
    cv2.imwrite(str(tmp_path / "p.png"), img)
    playlist = Playlist([str(tmp_path / "p.png")])
    playlist.set_bit_depth(12)
    assert int(playlist.grab().image[0, 0, 0]) == round(2000 / 4095 * 255)
    grab = LiveGrab(FolderWatchSource(inbox), timeout=2.0)
    grab.open()
    grab.set_bit_depth(12)
    cv2.imwrite(str(inbox / "p.png"), img)
    assert _grab_value(grab) == round(2000 / 4095 * 255)


def test_a_relative_watch_folder_logs_absolute_image_paths(inbox, monkeypatch):
    monkeypatch.chdir(inbox.parent)
    grab = LiveGrab(FolderWatchSource("inbox"), timeout=2.0)
    grab.open()
    (inbox / "p.png").write_bytes(_png(5))
    name = grab.grab().name
    assert Path(name).is_absolute() and Path(name) == inbox / "p.png"
