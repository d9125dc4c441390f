"""The link survives: a trigger while busy, an image that never comes, ``okng serve``
killed with SIGKILL and restarted (no result acknowledged twice, none lost from the log)."""
from __future__ import annotations

import csv
import io
import random
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("asyncua")
pytest.importorskip("pymodbus")

from line_support import (  # noqa: E402
    ModbusPlc,
    OpcUaPlc,
    Served,
    check_against_okng_score,
    demo_model,
    make_recipe,
    okng_score,
    playlist,
    poll,
    run_cycle,
)
from pymodbus.exceptions import ModbusException  # noqa: E402

from core.line.broker import free_port  # noqa: E402
from core.line.service import LineService, ServeOptions  # noqa: E402
from core.line.signals import ErrorCode  # noqa: E402
from core.line.sources import LiveGrab  # noqa: E402
from core.line.store import LineLog  # noqa: E402
from core.sources import FolderWatchSource  # noqa: E402


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    folder = tmp_path_factory.mktemp("line-faults")
    recipe = make_recipe(folder, "cells", demo_model(tmp_path_factory.getbasetemp() / "line-demo"))
    images = playlist()
    return {"recipe": recipe, "images": images, "reference": okng_score(recipe, images, folder / "ref.csv"),
            "folder": folder}


@pytest.fixture(scope="module")
def watched(cells, tmp_path_factory):
    """The station on a watched folder: a trigger waits (Busy) until the camera's file lands."""
    tmp_path = tmp_path_factory.mktemp("watched")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ports = {"modbus": free_port(), "opcua": free_port()}
    recipe = tmp_path / "cells.okrecipe"
    shutil.copy(cells["recipe"], recipe)
    source = LiveGrab(FolderWatchSource(inbox, stable_polls=1), timeout=3.0)
    svc = LineService(ServeOptions([recipe], source, modbus=f"127.0.0.1:{ports['modbus']}",
                                   opcua=f"127.0.0.1:{ports['opcua']}"))
    svc.start()
    yield {"svc": svc, "inbox": inbox, "ports": ports, "log": recipe.with_suffix(".results.sqlite")}
    svc.stop()


def _cycles_in(log_path) -> list:
    log = LineLog(log_path)
    try:
        return log.cycles()
    finally:
        log.close()


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
def test_a_trigger_while_busy_is_refused_with_error_code_1_and_never_queued(watched, cells, protocol):
    plc = (ModbusPlc if protocol == "modbus" else OpcUaPlc)(watched["ports"][protocol])
    base = 10 if protocol == "modbus" else 20
    try:
        plc.write("PartId", base + 1)
        plc.write("Trigger", True)
        poll(lambda: plc.read("Busy")["Busy"], what="Busy")  # waiting for the part's image
        plc.write("PartId", base + 2)
        plc.write("Trigger", True)
        s = plc.read()
        assert s["ErrorCode"] == ErrorCode.TRIGGER_WHILE_BUSY and s["Busy"] and not s["ResultReady"]
        first, second = cells["images"][0], cells["images"][1]
        shutil.copy(first, watched["inbox"] / f"{protocol}-a.png")
        held = poll(lambda: (r := plc.read())["ResultReady"] and r, what="the result")
        assert held["PartId"] == base + 1 and held["ErrorCode"] == 0  # the new cycle cleared the refusal's code
        assert ("OK" if held["Ok"] else "NG") == cells["reference"][first][0]
        plc.write("ResultAck", True)
        poll(lambda: plc.read("Ready")["Ready"], what="Ready")
        shutil.copy(second, watched["inbox"] / f"{protocol}-b.png")
        # a queued trigger would now take b.png; the next trigger must find it instead
        r, _ = run_cycle(plc, base + 3)
        assert r["PartId"] == base + 3 and ("OK" if r["Ok"] else "NG") == cells["reference"][second][0]
        ours = [c.part_id for c in _cycles_in(watched["log"]) if base < c.part_id < base + 10]
        assert ours == [base + 1, base + 3]
    finally:
        plc.close()


def test_an_image_that_lands_before_the_first_trigger_is_that_parts_image(cells, tmp_path):
    """The camera may be quicker than the PLC's trigger reaches the station: the watched folder
    is opened when serving starts, so a file written before the first trigger is still new."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(cells["images"][0], inbox / "there-before-serving.png")  # old: never a part's image
    recipe = tmp_path / "cells.okrecipe"
    shutil.copy(cells["recipe"], recipe)
    port = free_port()
    svc = LineService(ServeOptions([recipe], LiveGrab(FolderWatchSource(inbox, stable_polls=1), timeout=3.0),
                                   modbus=f"127.0.0.1:{port}"))
    svc.start()
    plc = ModbusPlc(port)
    try:
        image = cells["images"][1]
        shutil.copy(image, inbox / "first-part.png")  # written before the station sees a trigger
        r, _ = run_cycle(plc, 5)
        assert (r["ErrorCode"], r["PartId"]) == (0, 5)
        assert ("OK" if r["Ok"] else "NG") == cells["reference"][image][0]
    finally:
        plc.close()
        svc.stop()


def test_serving_from_a_folder_that_is_not_there_fails_at_the_start(cells, tmp_path):
    recipe = tmp_path / "cells.okrecipe"
    shutil.copy(cells["recipe"], recipe)
    svc = LineService(ServeOptions([recipe], LiveGrab(FolderWatchSource(tmp_path / "missing")),
                                   modbus=f"127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(Exception, match="folder not found"):
            svc.start()
    finally:
        svc.stop()


def test_no_image_in_time_is_the_cycles_result_with_error_code_4(watched):
    plc = ModbusPlc(watched["ports"]["modbus"])
    try:
        r, _ = run_cycle(plc, 99)  # nothing lands in the inbox: after the grab timeout, an error result
        assert (r["ErrorCode"], r["Ok"], r["Ng"], r["PartId"]) == (ErrorCode.NO_IMAGE, False, False, 99)
        (logged,) = [c for c in _cycles_in(watched["log"]) if c.part_id == 99]
        assert (logged.verdict, logged.error_code, logged.acked_at is not None) == ("ERROR", 4, True)
    finally:
        plc.close()


class Plc:
    """A Modbus PLC program that survives station restarts and keeps its own books:
    every result it read, and every ack the station confirmed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: dict[int, dict] = {}  # part id -> result as read
        self.confirmed_acks: list[int] = []
        self.next_part = 1000
        self.plc: ModbusPlc | None = None

    def connect(self) -> None:
        self.plc = ModbusPlc(self.port)

    def take_held_result(self) -> int | None:
        """After a (re)connect: a held result is read and acknowledged; it must never be one
        this PLC already had confirmed."""
        s = self.plc.read()
        if not s["ResultReady"]:
            return None
        part = s["PartId"]
        assert part not in self.confirmed_acks, f"part {part} presented again after its ack was confirmed"
        self.seen[part] = s
        self.ack(part)
        return part

    def ack(self, part: int) -> None:
        self.plc.write("ResultAck", True)  # raises if the station died before confirming
        self.confirmed_acks.append(part)

    def cycle(self) -> None:
        part = self.next_part
        self.next_part += 1
        self.plc.write("PartId", part)
        self.plc.write("Trigger", True)
        s = poll(lambda: (r := self.plc.read())["ResultReady"] and r, what="ResultReady")
        assert s["PartId"] == part
        self.seen[part] = s
        self.ack(part)
        poll(self.plc.ready, what="Ready")


def test_sigkill_and_restart_loses_no_result_and_acknowledges_none_twice(cells, tmp_path):
    recipe = tmp_path / "cells.okrecipe"
    shutil.copy(cells["recipe"], recipe)
    port = free_port()
    args = (str(recipe), "--images", *cells["images"], "--modbus", f"127.0.0.1:{port}")
    served = Served(*args, log=tmp_path / "serve.log")
    plc = Plc(port)
    plc.connect()
    try:
        for _ in range(10):
            plc.cycle()
        # killed while a result waits for its ack: presented again after the restart, acked once
        plc.plc.write("PartId", 5000)
        plc.plc.write("Trigger", True)
        before = poll(lambda: (r := plc.plc.read())["ResultReady"] and r, what="ResultReady")
        served.kill()
        served = Served(*args, log=tmp_path / "serve.log")
        plc.connect()
        assert plc.take_held_result() == 5000
        assert plc.seen[5000]["Score"] == before["Score"] and plc.seen[5000]["Ok"] == before["Ok"]
        # killed just after a confirmed ack: nothing presented after the restart
        plc.cycle()
        served.kill()
        served = Served(*args, log=tmp_path / "serve.log")
        plc.connect()
        assert plc.take_held_result() is None and plc.plc.read()["Ready"]
        # killed at random moments of a running line
        for seed in range(3):
            killer = threading.Timer(0.2 + random.Random(seed).random() * 0.5, served.kill)
            killer.start()
            with pytest.raises((ModbusException, OSError)):
                while True:  # until the station dies under the PLC's feet
                    plc.cycle()
            killer.join()
            served = Served(*args, log=tmp_path / "serve.log")
            plc.connect()
            plc.take_held_result()
            plc.cycle()
    finally:
        served.stop()

    log = {c.part_id: c for c in _cycles_in(recipe.with_suffix(".results.sqlite"))}
    for part, s in plc.seen.items():  # every result the PLC read is in the log, as read
        assert part in log, f"part {part}: the PLC read a result the log does not have"
        assert log[part].verdict == ("OK" if s["Ok"] else "NG") and log[part].score == pytest.approx(s["Score"], 1e-6)
    assert len(plc.confirmed_acks) == len(set(plc.confirmed_acks))
    assert all(log[p].acked_at is not None for p in plc.confirmed_acks)
    from core.results_log import ResultsLog

    with ResultsLog(recipe.with_suffix(".results.sqlite")) as results:
        entries = results.entries(limit=None)
    reference = cells["reference"]
    assert all(e.verdict == reference[e.image_path][0] for e in entries)  # and every logged verdict is right
    assert len(plc.seen) >= 17


def test_the_verdict_check_itself_can_fail(cells):
    """check_against_okng_score is not a tautology: a flipped verdict fails it."""
    verdict, score = cells["reference"][cells["images"][0]]
    wrong = {"Ok": verdict == "NG", "Ng": verdict == "OK", "Score": score, "ErrorCode": 0}
    with pytest.raises(AssertionError):
        check_against_okng_score([wrong], 0, cells["images"], cells["reference"])


class CrashingCamera:
    """A camera driver that fails in a way nobody planned for."""

    def grab(self):
        raise RuntimeError("camera driver crashed")

    def close(self) -> None:
        pass


def test_a_crashing_source_is_the_cycles_error_result_logged_and_released_by_the_ack(cells, tmp_path):
    recipe = tmp_path / "cells.okrecipe"
    shutil.copy(cells["recipe"], recipe)
    port = free_port()
    svc = LineService(ServeOptions([recipe], CrashingCamera(), modbus=f"127.0.0.1:{port}"))
    svc.start()
    plc = ModbusPlc(port)
    try:
        for part in (1, 2):  # the line is not stuck: the ack releases each error result
            r, _ = run_cycle(plc, part)
            assert (r["ErrorCode"], r["Ok"], r["Ng"], r["PartId"]) == (ErrorCode.NO_IMAGE, False, False, part)
    finally:
        plc.close()
        svc.stop()
    logged = _cycles_in(recipe.with_suffix(".results.sqlite"))
    assert [(c.part_id, c.verdict, c.acked_at is not None) for c in logged] == [(1, "ERROR", True), (2, "ERROR", True)]
    assert "camera driver crashed" in logged[0].error_text


def test_an_unreadable_image_tells_the_plc_why_before_which_file(tmp_path):
    """Found trying the line: in a folder whose name had spaces the path's words filled the
    PLC string and the reason ("file not found") never reached a Modbus PLC (64 characters)."""
    from core.line.handshake import LineError
    from core.line.modbus_server import decode, encode
    from core.line.signals import BY_NAME
    from core.line.sources import Playlist

    folder = tmp_path / "camera output of line 3"
    folder.mkdir()
    (folder / "part_0042_from_the_camera_with_a_long_name.png").write_bytes(b"not a png")
    for name, reason in (("gone.png", "file not found"), ("part_0042_from_the_camera_with_a_long_name.png", "")):
        with pytest.raises(LineError) as err:
            Playlist([str(folder / name)]).grab()
        text = str(err.value)
        assert text.startswith("image unreadable (") and text.endswith(f"): {name}") and "line 3" not in text
        assert err.value.code == ErrorCode.NO_IMAGE
        on_modbus = decode(BY_NAME["ErrorText"], encode(BY_NAME["ErrorText"], text))
        assert on_modbus.startswith("image unreadable (") and reason in on_modbus and len(on_modbus) <= 64


def test_a_night_shift_leaves_a_log_the_morning_can_read(cells, tmp_path):
    """Found on a night shift: error rows named no image, the export had no part id or reason,
    the counters left out the parts that got no verdict, *Keep copies of NG images* did
    nothing under ``okng serve``, and the engineer's re-inspections in the window went to the
    plant's MQTT topic as parts."""
    from core.line.sources import Playlist
    from core.line.store import Outbox
    from core.results_log import LogEntry, ResultsLog

    ng = next(p for p in cells["images"] if cells["reference"][p][0] == "NG")
    broken = tmp_path / "part_0016.png"
    broken.write_bytes(b"no picture here")
    recipe = make_recipe(tmp_path, "night", demo_model(tmp_path.parent / "line-demo"),
                         station={"copy_ng_images": True})
    log_path = recipe.with_suffix(".results.sqlite")
    outbox = Outbox(log_path, "mqtt:test")  # a sink that exists before the shift
    port = free_port()
    svc = LineService(ServeOptions([recipe], Playlist([ng, str(broken)]), modbus=f"127.0.0.1:{port}"))
    svc.start()
    plc = ModbusPlc(port)
    try:
        judged, failed = run_cycle(plc, 901)[0], run_cycle(plc, 902)[0]
    finally:
        plc.close()
        svc.stop()
    assert judged["Ng"] and failed["ErrorCode"] == ErrorCode.NO_IMAGE
    with ResultsLog(log_path) as log:
        log.add(LogEntry(1e10, ng, "", 1.0, "NG", 1.0, 1.0, "m", "engineer"))  # a review in the window
        error, part = log.entries(limit=3)[1:]
        assert error.image_path == str(broken) and error.verdict == "ERROR"  # was "(no image)"
        assert part.ng_copy and Path(part.ng_copy).is_file() and Path(part.ng_copy).parent == tmp_path / "night.ng"
        c = log.counters(since=0.0)
        assert (c.total, c.ng, c.errors) == (2, 2, 1)
        rows = list(csv.DictReader(io.StringIO(log.export_csv())))
    no_image = str(int(ErrorCode.NO_IMAGE))
    assert [(r["part_id"], r["error_code"]) for r in rows] == [("901", "0"), ("902", no_image), ("", "")]
    assert rows[1]["error_text"].startswith("image unreadable (") and rows[0]["acked_at"].startswith("20")
    assert [line["part_id"] for _, line in outbox.pending()] == [901, 902]  # the review is no line result
    assert outbox.count_pending() == 2
    outbox.close()
