"""Shared by the tests/core/test_line_*.py modules and benchmarks/bench_line.py: the demo
recipe (ELPV cells, the demo model of the CLI tests), its reference verdicts from
``okng score``, ``okng serve`` as a subprocess, and PLC clients on the real protocol
libraries (importers skip first when asyncua or pymodbus is missing)."""
from __future__ import annotations

import csv
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.sync import Client
from pymodbus.client import ModbusTcpClient

from core.line.opcua_server import NAMESPACE
from core.recipes import Recipe, save_recipe

N_IMAGES = 24  # the playlist: demo stream cells, good and defective, played in order


def demo_model(folder: Path) -> Path:
    """The demo model (fitted by ``okng fit`` on 20 OK cells), once per folder."""
    from core.demo import demo_split

    model = folder / "cells.okng"
    if not model.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "core.cli", "fit", *demo_split().ok_train[:20], "--out", str(model)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    return model


def playlist() -> list[str]:
    from core.demo import demo_split

    return demo_split().stream_paths[:N_IMAGES]


def make_recipe(folder: Path, name: str, model: Path, image_threshold: float | None = None,
                station: dict | None = None) -> Path:
    from core.persistence import load_detector

    pixel = None
    if image_threshold is not None:
        pixel = load_detector(model, runtime="torch").thresholds.pixel
    return save_recipe(Recipe(name, [], {}, str(model), image_threshold, pixel, dict(station or {})),
                       folder / f"{name}.okrecipe")


def okng_score(recipe: Path, paths: list[str], out: Path) -> dict[str, tuple[str, float]]:
    """path -> (verdict, score) from the real ``okng score`` on the recipe."""
    r = subprocess.run([sys.executable, "-m", "core.cli", "score", "--model", str(recipe), *paths, "--csv", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return {row["path"]: (row["verdict"], float(row["score"])) for row in csv.DictReader(out.open())}


def poll(predicate, timeout: float = 30.0, every: float = 0.002, what: str = "condition"):
    """Call ``predicate`` until it returns a true value (a PLC polls its inputs the same way)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1))))]


class Served:
    """``okng serve ARGS`` as a subprocess, as on a line PC; returns once it says ready."""

    def __init__(self, *args: str, log: Path, timeout: float = 180.0, verbose: bool = False) -> None:
        import os
        import select

        self.args, self.log = args, log
        self.err = log.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "core.cli", *(["-v"] if verbose else []), "serve", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env)
        deadline = time.monotonic() + timeout
        line = b""
        while b"ready" not in line:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"okng serve did not start: {log.read_text(errors='replace')[-3000:]}")
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
        self.banner = line.decode()

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup (a power cut of the process)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.err.close()

    def stop(self) -> int:
        """SIGTERM: the normal stop."""
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(60)
        self.err.close()
        return rc


# -- PLC clients: what a PLC does, with the real client libraries -------------------------
OUTPUTS = ("Ready", "Busy", "ResultReady", "Ok", "Ng", "PartId", "Score", "ErrorCode", "ActiveRecipe",
           "ResultRecipe")
TYPES = {"Trigger": ua.VariantType.Boolean, "ResultAck": ua.VariantType.Boolean,
         "RecipeIndex": ua.VariantType.UInt16, "PartId": ua.VariantType.UInt32}


class OpcUaPlc:
    """What a PLC's OPC UA client does, with asyncua's client."""

    def __init__(self, port: int) -> None:
        self.client = Client(f"opc.tcp://127.0.0.1:{port}/okng/", timeout=10)
        self.client.connect()
        idx = self.client.get_namespace_index(NAMESPACE)
        names = (*OUTPUTS, *TYPES, "ErrorText", "Heartbeat", "ScoreX1000")
        self.nodes = {n: self.client.get_node(f"ns={idx};s=Station.{n}") for n in names}

    def read(self, *names: str) -> dict:
        names = names or OUTPUTS
        return dict(zip(names, self.client.read_values([self.nodes[n] for n in names])))

    def write(self, name: str, value) -> None:
        self.nodes[name].write_value(ua.DataValue(ua.Variant(value, TYPES[name])))

    def close(self) -> None:
        self.client.disconnect()


class ModbusPlc:
    """What a PLC's Modbus master does, with pymodbus's client (addresses: README)."""

    def __init__(self, port: int) -> None:
        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        assert self.client.connect()

    def read(self, *names: str) -> dict:
        bits = self.client.read_coils(0, count=7).bits
        regs = self.client.read_holding_registers(0, count=10).registers
        result_recipe = self.client.read_holding_registers(42, count=1).registers[0]
        score = struct.unpack(">f", struct.pack(">HH", regs[6], regs[7]))[0]
        return {"Trigger": bits[0], "ResultAck": bits[1], "Ready": bits[2], "Busy": bits[3], "ResultReady": bits[4],
                "Ok": bits[5], "Ng": bits[6], "RecipeIndex": regs[0], "ActiveRecipe": regs[1], "Heartbeat": regs[2],
                "ErrorCode": regs[3], "PartId": regs[4] << 16 | regs[5], "Score": score, "ResultRecipe": result_recipe}

    def write(self, name: str, value) -> None:
        if name in ("Trigger", "ResultAck"):
            assert not self.client.write_coil({"Trigger": 0, "ResultAck": 1}[name], bool(value)).isError()
        elif name == "RecipeIndex":
            assert not self.client.write_register(0, int(value)).isError()
        else:
            assert not self.client.write_registers(4, [value >> 16, value & 0xFFFF]).isError()

    def ready_result(self) -> bool:
        return self.client.read_coils(4, count=1).bits[0]

    def ready(self) -> bool:
        return self.client.read_coils(2, count=1).bits[0]

    def close(self) -> None:
        self.client.close()


def run_cycle(plc, part: int) -> tuple[dict, float]:
    """One PLC cycle; returns the result read at ResultReady and the trigger->ResultReady time."""
    plc.write("PartId", part)
    t0 = time.perf_counter()
    plc.write("Trigger", True)
    poll(lambda: plc.read("ResultReady")["ResultReady"], every=0, what="ResultReady")
    latency = time.perf_counter() - t0
    result = plc.read()
    plc.write("ResultAck", True)
    poll(lambda: plc.read("Ready")["Ready"], every=0, what="Ready after the ack")
    return result, latency


def check_against_okng_score(results: list[dict], start: int, images: list[str], reference: dict) -> None:
    """Cycle k inspected image (start + k) of the playlist: its verdict and score are okng score's."""
    for k, r in enumerate(results):
        verdict, score = reference[images[(start + k) % len(images)]]
        got = "OK" if r["Ok"] else "NG" if r["Ng"] else "?"
        assert got == verdict, f"cycle {k}: the PLC got {got}, okng score says {verdict}"
        assert r["Score"] == pytest.approx(score, rel=1e-4, abs=1e-3)  # Modbus carries a float32
        assert r["ErrorCode"] == 0


