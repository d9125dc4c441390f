"""The PLC handshake, specified on the state machine alone (no protocol, no model)."""
from __future__ import annotations

import threading

import pytest

from core.line.handshake import CycleResult, Handshake, LineError
from core.line.signals import BY_NAME, COILS, N_REGISTERS, REGISTERS, SIGNALS, ErrorCode


class Watch:
    """Every value change the handshake announces, in order; waits on them without sleeping."""

    def __init__(self, hs: Handshake) -> None:
        self.changes: list[tuple[str, object]] = []
        self._cond = threading.Condition()
        self.hs = hs
        self.values = hs.snapshot()  # kept from the announcements: never takes the handshake's lock
        hs.add_listener(self._on)

    def _on(self, changes: dict) -> None:
        with self._cond:
            self.changes.extend(changes.items())
            self.values.update(changes)
            self._cond.notify_all()

    def until(self, name: str, value: object, timeout: float = 10.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.values[name] == value, timeout)
        assert ok, f"{name} never became {value!r}: {self.hs.snapshot()}"


class Line:
    """A handshake with a scripted 'detector': engines are recipe numbers, an inspection
    returns the engine's verdict and can be held mid-way by the test."""

    def __init__(self, verdicts: dict[int, str] | None = None, hold: bool = False) -> None:
        self.verdicts = verdicts or {1: "OK", 2: "NG"}
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.inspected: list[tuple[int, int]] = []  # (engine, part id)
        self.acked: list[int] = []
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.fail_ack = False
        self.hs = Handshake(self.inspect, self.load, self.record_ack)
        self.watch = Watch(self.hs)

    def inspect(self, engine: int, part: int) -> CycleResult:
        self.inspected.append((engine, part))
        assert self.gate.wait(10)
        if self.verdicts[engine] == "RAISE":
            raise RuntimeError("backbone exploded")
        return CycleResult(part, self.verdicts[engine], 1.5 * engine, recipe_index=engine, record=part)

    def load(self, index: int) -> int:
        assert self.load_gate.wait(10)
        if index not in self.verdicts:
            raise LineError(ErrorCode.UNKNOWN_RECIPE, f"recipe index {index} unknown")
        return index

    def record_ack(self, r: CycleResult) -> None:
        if self.fail_ack:
            raise OSError("disk full")
        self.acked.append(r.part_id)

    def started(self, recipe: int = 1) -> Line:
        self.hs.start(recipe)
        assert self.hs.wait_idle(10)
        self.watch.until("Ready", True)
        return self

    def cycle(self, part: int = 0) -> dict:
        if part:
            self.hs.plc_write("PartId", part)
        self.hs.plc_write("Trigger", True)
        self.watch.until("ResultReady", True)
        result = self.hs.snapshot()
        self.hs.plc_write("ResultAck", True)
        self.watch.until("Ready", True)
        return result


@pytest.fixture
def line():
    lines = []

    def make(**kw) -> Line:
        lines.append(Line(**kw))
        return lines[-1]

    yield make
    for ln in lines:
        ln.gate.set()
        ln.load_gate.set()
        ln.hs.close()


def test_signal_map_addresses_do_not_overlap_and_fit_the_declared_table():
    assert len({s.name for s in SIGNALS}) == len(SIGNALS)
    assert sorted(s.address for s in COILS) == list(range(len(COILS)))
    used = [a for s in REGISTERS for a in range(s.address, s.address + s.registers)]
    assert len(used) == len(set(used)) and max(used) + 1 == N_REGISTERS
    assert {s.name for s in SIGNALS if s.plc_writable} == {"Trigger", "ResultAck", "RecipeIndex", "PartId"}


def test_a_cycle_trigger_busy_result_held_until_ack(line):
    ln = line(hold=True).started()
    ln.hs.plc_write("PartId", 4711)
    ln.hs.plc_write("Trigger", True)
    ln.watch.until("Busy", True)
    s = ln.hs.snapshot()
    assert (s["Ready"], s["ResultReady"], s["Trigger"]) == (False, False, False)  # the trigger bit is taken
    ln.gate.set()
    ln.watch.until("ResultReady", True)
    s = ln.hs.snapshot()
    assert (s["Busy"], s["Ready"], s["Ok"], s["Ng"], s["PartId"], s["Score"], s["ScoreX1000"], s["ErrorCode"]) == (
        False, False, True, False, 4711, 1.5, 1500, 0)
    assert ln.acked == []  # held: nothing acknowledged until the PLC says so
    ln.hs.plc_write("ResultAck", True)
    ln.watch.until("Ready", True)
    s = ln.hs.snapshot()
    assert (s["ResultReady"], s["Ok"], s["Ng"], s["PartId"], s["ResultAck"]) == (False, False, False, 0, False)
    assert ln.acked == [4711]


def test_result_values_are_set_before_result_ready_in_the_announced_order(line):
    ln = line().started()
    ln.cycle(part=9)
    order = [name for name, _ in ln.watch.changes]
    ready_at = max(i for i, (n, v) in enumerate(ln.watch.changes) if n == "ResultReady" and v is True)
    for name in ("Score", "Ok", "PartId", "Busy"):
        assert max(i for i, n in enumerate(order[:ready_at]) if n == name) < ready_at


def test_trigger_while_busy_is_refused_with_an_error_code_and_never_queued(line):
    ln = line(hold=True).started()
    ln.hs.plc_write("Trigger", True)
    ln.watch.until("Busy", True)
    ln.hs.plc_write("Trigger", True)
    assert ln.hs.value("ErrorCode") == ErrorCode.TRIGGER_WHILE_BUSY and "running" in ln.hs.value("ErrorText")
    ln.gate.set()
    ln.watch.until("ResultReady", True)
    ln.hs.plc_write("ResultAck", True)
    ln.watch.until("Ready", True)
    assert len(ln.inspected) == 1 and ln.hs.value("Busy") is False  # the refused trigger left no cycle behind
    assert ln.hs.refused == 1


def test_trigger_while_a_result_waits_for_its_ack_is_refused_and_the_result_kept(line):
    ln = line().started()
    ln.hs.plc_write("PartId", 5)
    ln.hs.plc_write("Trigger", True)
    ln.watch.until("ResultReady", True)
    ln.hs.plc_write("PartId", 6)
    ln.hs.plc_write("Trigger", True)
    s = ln.hs.snapshot()
    assert s["ErrorCode"] == ErrorCode.RESULT_NOT_ACKNOWLEDGED and s["ResultReady"] and s["Ok"]
    assert ln.inspected == [(1, 5)]
    ln.hs.plc_write("ResultAck", True)  # the ack releases the result and the refusal with it
    ln.watch.until("Ready", True)
    s = ln.hs.snapshot()
    assert (s["ErrorCode"], s["ErrorText"]) == (ErrorCode.NONE, "")  # never "not acknowledged" beside Ready


def test_trigger_before_any_recipe_is_loaded_is_refused(line):
    ln = line()
    ln.hs.plc_write("Trigger", True)
    assert ln.hs.value("ErrorCode") == ErrorCode.NOT_READY and ln.inspected == []


def test_part_ids_come_from_the_plc_or_are_numbered_by_the_station(line):
    ln = line().started()
    assert ln.cycle(part=100)["PartId"] == 100
    generated = [ln.cycle()["PartId"] for _ in range(3)]
    assert generated == [101, 102, 103]  # after the highest seen, never reused
    assert ln.acked == [100, 101, 102, 103]


def test_an_ack_that_cannot_be_recorded_keeps_the_result_held(line):
    ln = line().started()
    ln.hs.plc_write("Trigger", True)
    ln.watch.until("ResultReady", True)
    ln.fail_ack = True
    ln.hs.plc_write("ResultAck", True)
    s = ln.hs.snapshot()
    assert s["ErrorCode"] == ErrorCode.ACK_NOT_RECORDED and s["ResultReady"] and not s["Ready"]
    ln.fail_ack = False
    ln.hs.plc_write("ResultAck", True)
    ln.watch.until("Ready", True)
    assert len(ln.acked) == 1


def test_an_ack_without_a_held_result_records_nothing(line):
    ln = line().started()
    ln.cycle(part=1)
    ln.hs.plc_write("ResultAck", True)
    ln.hs.plc_write("ResultAck", True)
    assert ln.acked == [1] and ln.hs.value("ErrorCode") == 0


def test_a_failed_inspection_is_the_cycles_result_with_an_error_code(line):
    ln = line(verdicts={1: "RAISE"}).started()
    s = ln.cycle(part=3)
    assert (s["ResultReady"], s["Ok"], s["Ng"], s["ErrorCode"]) == (True, False, False, ErrorCode.INSPECTION_FAILED)
    assert "backbone exploded" in s["ErrorText"]
    assert ln.acked == [3]  # acknowledged like any result: the line moves on


def test_error_text_names_the_file_not_its_folders_and_shows_where_it_was_cut():
    """A deep folder used to fill the 200 characters and cut the reason off mid-word."""
    from core.line.modbus_server import decode, encode
    from core.line.signals import plc_text

    deep = "/srv/line/cameras/station-3/2026-12-03/batch-0042/shift-b/archive/incoming/" + "sub/" * 40
    text = f"cannot read {deep}part_000123.png: the file is cut short (PNG); check the camera's share"
    assert plc_text(text) == "cannot read part_000123.png: the file is cut short (PNG); check the camera's share"
    assert plc_text(r"cannot read C:\line\in\part_7.bmp: empty") == "cannot read part_7.bmp: empty"
    assert plc_text("cannot read 'images/ok/p.png'; retried") == "cannot read 'p.png'; retried"
    for other in ("mqtt://broker:1883/line/station/errors refused", "opc.tcp://plc:4840/freeopcua/server/ refused",
                  "batch 2026/12/03 late", "OK/NG folders", r"C:\Users\Ana Lee\Pictures"):
        assert plc_text(other) == other  # URLs, dates, folders: as they were
    long = "the recipe could not load because " + "its model file is damaged " * 12
    cut = plc_text(long)
    assert len(cut) <= 200 and cut.endswith("...") and long.startswith(cut[:-3]) and cut[-4] != " "
    assert long.startswith(cut[:-3].rstrip()) and not cut[:-3].endswith("damag")  # cut at a word
    on_modbus = decode(BY_NAME["ErrorText"], encode(BY_NAME["ErrorText"], text))
    assert on_modbus == "cannot read part_000123.png: the file is cut short (PNG)..."
    assert len(on_modbus) <= 64


def test_the_station_signals_are_not_the_plcs_to_write(line):
    ln = line().started()
    for sig in SIGNALS:
        if not sig.plc_writable:
            assert ln.hs.plc_write(sig.name, sig.default) is False
    assert ln.hs.plc_write("NoSuchSignal", 1) is False
    assert ln.hs.value("Ready") is True


def test_heartbeat_counts_and_wraps_at_16_bits(line):
    ln = line()
    for _ in range(3):
        ln.hs.beat()
    assert ln.hs.value("Heartbeat") == 3
    with ln.hs._lock:
        ln.hs._set(Heartbeat=0xFFFF)
    ln.hs.beat()
    assert ln.hs.value("Heartbeat") == 0


def test_a_recipe_switch_loads_in_the_background_while_the_old_recipe_inspects(line):
    ln = line().started(1)
    ln.load_gate.clear()  # recipe 2 takes its time to load
    ln.hs.plc_write("RecipeIndex", 2)
    assert ln.cycle()["Ok"] is True  # still recipe 1, and the trigger was not refused
    assert ln.hs.value("ActiveRecipe") == 1
    ln.load_gate.set()
    ln.watch.until("ActiveRecipe", 2)
    assert ln.cycle()["Ng"] is True
    assert [e for e, _ in ln.inspected] == [1, 2]


def test_the_part_in_flight_at_a_recipe_switch_says_it_was_judged_by_the_old_recipe(line):
    """ActiveRecipe turns 2 as soon as recipe 2 has loaded, even while a part triggered under
    recipe 1 is still being inspected with recipe 1's engine: ResultRecipe, held with the
    result and cleared with the ack, says which recipe judged it."""
    ln = line(hold=True).started(1)
    ln.hs.plc_write("Trigger", True)
    ln.watch.until("Busy", True)
    ln.hs.plc_write("RecipeIndex", 2)
    ln.watch.until("ActiveRecipe", 2)  # loaded while part 1 is in flight
    ln.gate.set()
    ln.watch.until("ResultReady", True)
    s = ln.hs.snapshot()
    assert (s["Ok"], s["ActiveRecipe"], s["ResultRecipe"]) == (True, 2, 1)
    ln.hs.plc_write("ResultAck", True)
    ln.watch.until("Ready", True)
    assert ln.hs.value("ResultRecipe") == 0
    s = ln.cycle()
    assert (s["Ng"], s["ResultRecipe"]) == (True, 2)


def test_an_unknown_recipe_index_is_refused_and_the_active_recipe_kept(line):
    ln = line().started(1)
    ln.hs.plc_write("RecipeIndex", 9)
    assert ln.hs.wait_idle(10)
    s = ln.hs.snapshot()
    assert (s["ErrorCode"], s["ActiveRecipe"], s["Ready"]) == (ErrorCode.UNKNOWN_RECIPE, 1, True)
    assert ln.cycle()["Ok"] is True
    # a failed recipe switch is no refused trigger (okng serve's summary counted it as one)
    assert (ln.hs.refused, ln.hs.faults) == (0, 1)
    # a switch that then succeeds clears the refusal: a PLC waiting for ActiveRecipe == 2 and
    # ErrorCode == 0 used to wait until the next trigger (found trying the line)
    ln.hs.plc_write("RecipeIndex", 9)
    assert ln.hs.wait_idle(10) and ln.hs.value("ErrorCode") == ErrorCode.UNKNOWN_RECIPE
    ln.hs.plc_write("RecipeIndex", 2)
    ln.watch.until("ActiveRecipe", 2)
    assert (ln.hs.value("ErrorCode"), ln.hs.value("ErrorText"), ln.hs.value("Ready")) == (0, "", True)


def test_okng_serves_summary_counts_refused_triggers_and_other_refusals_apart():
    from core.line.command import serve_summary

    assert serve_summary({"cycles": 8, "refused": 1, "faults": 2}) == \
        "stopped after 8 cycles (1 trigger refused; 2 recipe switch(es) or acknowledgement(s) failed)"
    assert serve_summary({"cycles": 1, "refused": 0, "faults": 0}) == "stopped after 1 cycle (0 triggers refused)"


def test_a_restored_result_is_presented_and_held_until_acknowledged(line):
    ln = line().started()
    ln.hs.restore(CycleResult(41, "NG", 7.25, recipe_index=1, record=41))
    s = ln.hs.snapshot()
    assert (s["ResultReady"], s["Ng"], s["PartId"], s["Score"], s["Ready"]) == (True, True, 41, 7.25, False)
    ln.hs.plc_write("Trigger", True)
    assert ln.hs.value("ErrorCode") == ErrorCode.RESULT_NOT_ACKNOWLEDGED
    ln.hs.plc_write("ResultAck", True)
    ln.watch.until("Ready", True)
    assert ln.acked == [41] and ln.cycle()["PartId"] == 42


def test_score_is_float_and_scaled_int_for_plcs_without_floats():
    assert BY_NAME["Score"].registers == 2 and BY_NAME["ScoreX1000"].kind == "int32"


def test_part_ids_wrap_to_1_after_the_largest_uint32(line):
    ln = line().started()
    assert ln.cycle(part=0xFFFFFFFF)["PartId"] == 0xFFFFFFFF
    assert ln.cycle()["PartId"] == 1
