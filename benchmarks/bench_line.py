"""The station on a line: trigger -> ResultReady latency over OPC UA and Modbus TCP against
the inference time alone, and a 30 s MQTT broker outage.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_line.py [--cycles 1000] [--outage 30]

``okng serve`` runs as a subprocess on the demo recipe (the demo model of the tests, fitted
on 20 OK ELPV cells), the PLC is the asyncua / pymodbus client of tests/core/line_support.py,
polling ResultReady as fast as it can (a PLC scan polls too). Latency = from the Trigger write
returning... to the first read that shows ResultReady=1: it contains the grab (read the image
file, hash it), the inspection, the results-log commit and the protocol round trips.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "core")]

from line_support import (  # noqa: E402
    ModbusPlc,
    OpcUaPlc,
    Served,
    demo_model,
    make_recipe,
    percentile,
    playlist,
    poll,
    run_cycle,
)

from core.line.broker import LocalBroker, free_port  # noqa: E402


def ms(values: list[float]) -> str:
    return f"median {percentile(values, 50) * 1e3:6.1f} ms   p99 {percentile(values, 99) * 1e3:6.1f} ms"


def inference_alone(recipe: Path, images: list[str], n: int) -> tuple[list[float], list[float]]:
    """Detector.inspect on one image at a time, as the station does; and with the file read."""
    from core.imageio import load_image
    from core.line.service import LineService  # noqa: F401 - same import cost as the station
    from core.persistence import load_detector
    from core.recipes import load_recipe

    det = load_detector(load_recipe(recipe).model_path)
    det.warm_up()
    loaded = [load_image(p) for p in images]
    det.inspect([loaded[0]])
    infer, with_read = [], []
    for k in range(n):
        t = time.perf_counter()
        img = load_image(images[k % len(images)])
        t1 = time.perf_counter()
        det.inspect([img])
        t2 = time.perf_counter()
        infer.append(t2 - t1)
        with_read.append(t2 - t)
    print(f"runtime {det.runtime_name}", file=sys.stderr)
    return infer, with_read


def inference_in_fresh_process(recipe: Path, images: list[str], n: int) -> tuple[list[float], list[float]]:
    """:func:`inference_alone` in a new process, as ``okng serve`` runs (no client libraries,
    no benchmark state beside it)."""
    import json
    import subprocess

    code = (f"import json, sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'benchmarks')]!r}; "
            f"from bench_line import inference_alone; "
            f"print('TIMES', json.dumps(inference_alone(__import__('pathlib').Path({str(recipe)!r}), "
            f"{images!r}, {n})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    infer, with_read = json.loads(out.split("TIMES", 1)[1])
    return infer, with_read


def station_times(serve_log: Path) -> dict[int, float]:
    """part id -> seconds the station spent on it (grab, inspect, log), from ``okng -v serve``."""
    import re

    times = {}
    for m in re.finditer(r"part (\d+): \S+, grab and inspect ([\d.]+) ms, log ([\d.]+) ms", serve_log.read_text()):
        times[int(m.group(1))] = (float(m.group(2)) + float(m.group(3))) / 1e3
    return times


def cycles(plc, n: int, first_part: int) -> list[float]:
    out = []
    for k in range(n):
        _, dt = run_cycle(plc, first_part + k)
        out.append(dt)
    return out


def outage(recipe: Path, images: list[str], seconds: float, folder: Path) -> None:
    with LocalBroker(record=True) as broker:
        port = free_port()
        served = Served(str(recipe), "--images", *images, "--modbus", f"127.0.0.1:{port}", "--mqtt",
                        f"127.0.0.1:{broker.port}", log=folder / "outage.log")
        plc = ModbusPlc(port)
        stop, running, parked = threading.Event(), threading.Event(), threading.Event()
        running.set()
        parts: list[int] = []

        def line() -> None:
            while not stop.is_set():
                if not running.is_set():
                    parked.set()
                    running.wait()
                run_cycle(plc, 1 + len(parts))
                parts.append(1 + len(parts))
                stop.wait(0.1)  # a part every ~0.1 s plus the inspection

        t = threading.Thread(target=line)
        t.start()
        stop.wait(3)
        running.clear()  # a moment's pause: the broker's recorder writes after its ack; let it catch up
        parked.wait()
        poll(lambda: len(broker.messages()) >= len(parts), every=0.05, what="the recorder")
        broker.stop()
        running.set()
        down_at, before = time.monotonic(), len(parts)
        stop.wait(seconds)
        broker.start()
        up_at, during = time.monotonic(), len(parts) - before
        stop.wait(3)
        stop.set()
        t.join()
        total = len(parts)
        poll(lambda: len({m["payload"]["part_id"] for m in broker.messages()}) >= total, timeout=120,
             every=0.05, what="every result")
        done_at = time.monotonic()
        plc.close()
        served.stop()
        ids = [m["payload"]["part_id"] for m in broker.messages()]
        firsts = list(dict.fromkeys(ids))
        print(f"broker down {up_at - down_at:.1f} s: {during} inspections made meanwhile; "
              f"{total} results in all, {len(firsts)} arrived, in order: {firsts == sorted(firsts) == parts}, "
              f"duplicates {len(ids) - len(firsts)}; backlog delivered {done_at - up_at:.1f} s after the restart "
              f"(the last inspections ran 3 s after it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--outage", type=float, default=30.0, help="seconds the broker is down (0: skip)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-line-"))
    recipe = make_recipe(folder, "cells", demo_model(folder / "model"))
    images = playlist()
    infer, with_read = inference_in_fresh_process(recipe, images, args.cycles)
    print(f"inference alone            {ms(infer)}")
    print(f"read image + inference     {ms(with_read)}")
    ports = {"opcua": free_port(), "modbus": free_port()}
    served = Served(str(recipe), "--images", *images, "--opcua", f"127.0.0.1:{ports['opcua']}", "--modbus",
                    f"127.0.0.1:{ports['modbus']}", log=folder / "serve.log", verbose=True)
    runs = []
    try:
        for name, make, first in (("Modbus TCP", ModbusPlc, 1), ("OPC UA", OpcUaPlc, 1_000_000)):
            plc = make(ports["opcua" if make is OpcUaPlc else "modbus"])
            cycles(plc, 20, first + 900_000)  # warm-up
            runs.append((name, first, cycles(plc, args.cycles, first)))
            plc.close()
    finally:
        served.stop()
    station = station_times(folder / "serve.log")
    for name, first, lat in runs:
        inside = [station[first + k] for k in range(len(lat))]
        overhead = [a - b for a, b in zip(lat, inside)]
        print(f"{name:<11} trigger -> ResultReady {ms(lat)}   ({len(lat)} cycles)")
        print(f"{'':<11}   of which grab + inspect + log in the station {ms(inside)}")
        print(f"{'':<11}   the rest (protocol, threads, the PLC's polling) {ms(overhead)}")
    infer, _ = inference_in_fresh_process(recipe, images, args.cycles)  # again: the machine's load drifts
    print(f"inference alone, after     {ms(infer)}")
    if args.outage:
        outage(recipe, images, args.outage, folder)


if __name__ == "__main__":
    main()
