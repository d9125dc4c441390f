"""``okng serve`` driven by a PLC over OPC UA (asyncua client) and Modbus TCP (pymodbus
client): real servers in a real ``okng serve`` process, on the demo recipe, every verdict
checked against ``okng score`` on the same images."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("asyncua")
pytest.importorskip("pymodbus")

from asyncua import ua  # noqa: E402
from line_support import (  # noqa: E402
    ModbusPlc,
    OpcUaPlc,
    Served,
    check_against_okng_score,
    demo_model,
    make_recipe,
    okng_score,
    percentile,
    playlist,
    poll,
    run_cycle,
)

from core.line.broker import free_port  # noqa: E402
from core.line.signals import ErrorCode  # noqa: E402
from core.line.store import LineLog  # noqa: E402

CYCLES = 1000
@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A line PC: ``okng serve`` on two recipes (the demo recipe; the same model with a
    threshold nothing reaches), Modbus and OPC UA, the demo stream cells in order."""
    base = tmp_path_factory.getbasetemp() / "line-demo"
    model = demo_model(base)
    folder = tmp_path_factory.mktemp("line-plc")
    cells = make_recipe(folder, "cells", model)
    lenient = make_recipe(folder, "lenient", model, image_threshold=1e12)
    images = playlist()
    reference = okng_score(cells, images, folder / "reference.csv")
    assert {v for v, _ in reference.values()} == {"OK", "NG"}  # both verdicts occur: the comparison can fail
    ports = {"opcua": free_port(), "modbus": free_port()}
    served = Served(str(cells), str(lenient), "--images", *images, "--opcua", f"127.0.0.1:{ports['opcua']}",
                    "--modbus", f"127.0.0.1:{ports['modbus']}", "--heartbeat", "0.1", log=folder / "serve.log")
    yield {"served": served, "ports": ports, "images": images, "reference": reference, "recipes": (cells, lenient)}
    assert served.stop() == 0


def _cycles(plc, line, n: int, first_part: int) -> None:
    status_before = plc.read()
    assert status_before["Ready"] and not status_before["ResultReady"]
    start = _played(line)
    results, latencies = [], []
    for k in range(n):
        r, dt = run_cycle(plc, first_part + k)
        assert r["PartId"] == first_part + k
        results.append(r)
        latencies.append(dt)
    check_against_okng_score(results, start, line["images"], line["reference"])
    print(f"\n{type(plc).__name__}: {n} cycles, trigger->ResultReady median {percentile(latencies, 50) * 1e3:.1f} ms, "
          f"p99 {percentile(latencies, 99) * 1e3:.1f} ms")


def _played(line) -> int:
    """How many images the station has taken so far (its results log counts them)."""
    log = LineLog(line["recipes"][0].with_suffix(".results.sqlite"))
    lenient = LineLog(line["recipes"][1].with_suffix(".results.sqlite"))
    try:
        return len(log.cycles()) + len(lenient.cycles())
    finally:
        log.close()
        lenient.close()


def test_a_modbus_plc_drives_1000_cycles_and_every_verdict_is_okng_scores(line):
    plc = ModbusPlc(line["ports"]["modbus"])
    try:
        _cycles(plc, line, CYCLES, first_part=100_000)
    finally:
        plc.close()


def test_an_opcua_plc_drives_1000_cycles_and_every_verdict_is_okng_scores(line):
    plc = OpcUaPlc(line["ports"]["opcua"])
    try:
        _cycles(plc, line, CYCLES, first_part=200_000)
    finally:
        plc.close()


def test_every_cycle_is_in_the_results_log_and_acknowledged_exactly_once(line):
    log = LineLog(line["recipes"][0].with_suffix(".results.sqlite"))
    try:
        cycles = log.cycles()
    finally:
        log.close()
    assert len(cycles) >= 2 * CYCLES
    assert all(c.acked_at is not None for c in cycles)
    parts = [c.part_id for c in cycles]
    assert len(parts) == len(set(parts))  # one row per part: no result logged (or acknowledged) twice


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
def test_a_plc_that_drops_the_connection_mid_cycle_finds_its_result_held_on_reconnect(line, protocol):
    make = ModbusPlc if protocol == "modbus" else OpcUaPlc
    port = line["ports"][protocol]
    part = 300_000 if protocol == "modbus" else 400_000
    start = _played(line)
    plc = make(port)
    plc.write("PartId", part)
    plc.write("Trigger", True)
    plc.close()  # the PLC restarts (or the cable is pulled) while the station inspects
    plc = make(port)
    try:
        held = poll(lambda: (r := plc.read())["ResultReady"] and r, what="the held result")
        assert held["PartId"] == part and not held["Ready"]
        check_against_okng_score([held], start, line["images"], line["reference"])
        plc.write("ResultAck", True)
        poll(lambda: plc.read("Ready")["Ready"], what="Ready")
        r, _ = run_cycle(plc, part + 1)  # and the line goes on
        check_against_okng_score([r], start + 1, line["images"], line["reference"])
    finally:
        plc.close()


def test_a_write_to_a_station_signal_is_refused_over_modbus(line):
    plc = ModbusPlc(line["ports"]["modbus"])
    try:
        assert plc.client.write_coil(4, True).isError()  # ResultReady is the station's
        assert plc.client.write_register(3, 0).isError()  # ErrorCode too
        assert plc.client.write_registers(0, [1, 2]).isError()  # RecipeIndex ok, ActiveRecipe not: refused whole
        assert plc.client.read_coils(100, count=1).isError()
        assert not plc.read()["ResultReady"]
    finally:
        plc.close()


def test_a_write_to_a_station_signal_is_refused_over_opcua(line):
    plc = OpcUaPlc(line["ports"]["opcua"])
    try:
        with pytest.raises(ua.UaStatusCodeError) as refused:
            plc.nodes["ResultReady"].write_value(ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
        assert refused.value.code == ua.StatusCodes.BadUserAccessDenied  # what the README says
        assert plc.read("ResultReady")["ResultReady"] is False
    finally:
        plc.close()


def test_the_heartbeat_counts_on_both_links(line):
    mb, ua_plc = ModbusPlc(line["ports"]["modbus"]), OpcUaPlc(line["ports"]["opcua"])
    try:
        first = mb.read()["Heartbeat"]
        poll(lambda: (mb.read()["Heartbeat"] - first) % 65536 >= 2, timeout=5, what="two heartbeats on Modbus")
        h = ua_plc.read("Heartbeat")["Heartbeat"]
        poll(lambda: ua_plc.read("Heartbeat")["Heartbeat"] != h, timeout=5, what="a heartbeat on OPC UA")
    finally:
        mb.close()
        ua_plc.close()


def test_a_recipe_switch_during_a_run_takes_effect_between_two_parts(line):
    """The PLC switches to recipe 2 while it keeps cycling: no trigger is refused, each
    result says which recipe judged it (ResultRecipe), recipe 1's results are its verdicts,
    recipe 2's are OK (its threshold is out of reach), and the switch happens once."""
    plc = ModbusPlc(line["ports"]["modbus"])
    try:
        start = _played(line)
        plc.write("RecipeIndex", 2)
        results = []
        # cycle until recipe 2 has judged ten parts: how many parts recipe 1 judges meanwhile
        # is the load time (under a second alone, longer on a busy machine), not what is tested
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r, _ = run_cycle(plc, 500_000 + len(results))
            results.append(r)
            if sum(x["ResultRecipe"] == 2 for x in results) >= 10:
                break
        judged_by = [r["ResultRecipe"] for r in results]
        assert judged_by[-1] == 2 and judged_by == sorted(judged_by)  # 1, 1, ..., 2, 2: one switch
        first2 = judged_by.index(2)
        check_against_okng_score(results[:first2], start, line["images"], line["reference"])
        # ActiveRecipe turns 2 when recipe 2 has loaded, so a part already in flight may read 2
        # there while recipe 1 judged it: ResultRecipe is what says which recipe did
        assert all(r["ActiveRecipe"] >= r["ResultRecipe"] for r in results)
        after = results[first2:]
        assert all(r["Ok"] and not r["Ng"] and r["ErrorCode"] == 0 for r in after), after
        plc.write("RecipeIndex", 7)  # no such recipe: refused, recipe 2 stays
        poll(lambda: plc.read()["ErrorCode"] == ErrorCode.UNKNOWN_RECIPE, what="ErrorCode 6")
        assert plc.read()["ActiveRecipe"] == 2 and plc.read()["Ready"]
        plc.write("RecipeIndex", 1)
        poll(lambda: plc.read()["ActiveRecipe"] == 1, what="back to recipe 1")
    finally:
        plc.close()
