"""Results to MQTT: one JSON message per inspection, read from the results log, sent in
order, nothing lost across a broker outage or a station crash. A real broker (amqtt, as a
subprocess: core/line/broker.py) and the real paho-mqtt client on both ends."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("paho.mqtt")
pytest.importorskip("amqtt")
pytest.importorskip("pymodbus")
pytest.importorskip("asyncua")

import paho.mqtt.client as mqtt  # noqa: E402
from line_support import ModbusPlc, Served, demo_model, make_recipe, playlist, poll, run_cycle  # noqa: E402

from core.line.broker import LocalBroker, free_port  # noqa: E402
from core.line.mqtt_publisher import WINDOW, MqttPublisher, MqttSettings  # noqa: E402
from core.line.store import LineLog, Outbox  # noqa: E402
from core.results_log import LogEntry  # noqa: E402

TOPIC = "plant/line3/okng"
OUTAGE = 3.0  # seconds in the suite; benchmarks/bench_line.py runs the 30 s outage


def entry(i: int) -> LogEntry:
    return LogEntry(1_800_000_000.0 + i, f"/line/in/part{i}.png", f"{i:064x}", 10.0 + i,
                    "NG" if i % 3 == 0 else "OK", 12.0, 30.0, "cells.okng@20261201T090000", "line")


@pytest.fixture
def broker():
    with LocalBroker(record=True) as b:
        yield b


def settings(broker, topic=TOPIC, qos=1) -> MqttSettings:
    return MqttSettings("127.0.0.1", broker.port, topic, qos, backoff_min=0.2, backoff_max=1.0,
                        client_id=f"okng-test-{topic}")


class Subscriber:
    """A plant system listening with paho-mqtt."""

    def __init__(self, broker, topic=TOPIC) -> None:
        self.messages: list[dict] = []
        self.cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plant-historian")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.messages.append(json.loads(msg.payload))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.messages) >= n, timeout), f"{len(self.messages)} of {n}"
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_each_result_is_one_json_message_with_the_documented_fields(broker, tmp_path):
    path = tmp_path / "cells.results.sqlite"
    log = LineLog(path)
    sub = Subscriber(broker)
    pub = MqttPublisher(path, settings(broker), {"station": "line-pc-3", "recipe": "cells"})
    pub.start()
    try:
        poll(lambda: pub.connected, what="the publisher's connection")
        ids = [log.record(entry(i), part_id=4700 + i, recipe_index=1) for i in range(1, 6)]
        pub.wake()
        got = sub.wait_for(5)
        assert [m["id"] for m in got] == ids and [m["part_id"] for m in got] == [4701, 4702, 4703, 4704, 4705]
        m = got[2]
        assert m == {"id": ids[2], "station": "line-pc-3", "recipe": "cells", "part_id": 4703,
                     "time": "2027-01-15T08:00:03.000Z", "score": 13.0, "verdict": "NG", "image_threshold": 12.0,
                     "pixel_threshold": 30.0, "model_id": "cells.okng@20261201T090000",
                     "image_sha256": f"{3:064x}", "image_path": "/line/in/part3.png", "error_code": 0,
                     "error_text": ""}
        poll(lambda: pub.published_upto == ids[-1], what="the published mark")
    finally:
        pub.stop()
        sub.close()
        log.close()
    outbox = Outbox(path, f"mqtt:{TOPIC}")
    assert outbox.published_upto == ids[-1] and outbox.pending() == []  # the mark is on disk
    outbox.close()


def test_rows_logged_before_the_first_publisher_are_history_and_not_sent(broker, tmp_path):
    path = tmp_path / "cells.results.sqlite"
    log = LineLog(path)
    old = [log.record(entry(i), i, 1) for i in range(3)]
    sub = Subscriber(broker)
    pub = MqttPublisher(path, settings(broker))
    pub.start()
    try:
        poll(lambda: pub.connected, what="connected")
        new = log.record(entry(9), 9, 1)
        pub.wake()
        assert [m["id"] for m in sub.wait_for(1)] == [new] and new > max(old)
    finally:
        pub.stop()
        sub.close()
        log.close()


def first_occurrences(ids: list[int]) -> list[int]:
    seen, out = set(), []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def test_a_broker_outage_loses_nothing_and_the_order_is_kept(broker, tmp_path):
    path = tmp_path / "cells.results.sqlite"
    log = LineLog(path)
    pub = MqttPublisher(path, settings(broker))
    pub.start()
    try:
        poll(lambda: pub.connected, what="connected")
        ids = [log.record(entry(i), i, 1) for i in range(20)]
        pub.wake()
        poll(lambda: pub.published_upto == ids[-1], what="the first 20 sent")
        # the broker acknowledges before its recorder has written: let it catch up (a broker
        # that dies between its ack and its own storage loses the message: its contract, not ours)
        poll(lambda: len(broker.messages()) >= 20, what="the broker to record the first 20")
        broker.stop()
        ids += [log.record(entry(i), i, 1) for i in range(20, 50)]  # made while the broker is down
        poll(lambda: not pub.connected, what="the publisher to notice")
        time.sleep(OUTAGE)  # the outage itself: the publisher retries with back-off meanwhile
        assert pub.published_upto == ids[19] and pub.connects == 1
        broker.start()
        ids += [log.record(entry(i), i, 1) for i in range(50, 60)]
        pub.wake()
        poll(lambda: pub.published_upto == ids[-1], timeout=30, what="the backlog sent")
    finally:
        pub.stop()
        log.close()
    received = [m["payload"]["id"] for m in broker.messages()]
    assert first_occurrences(received) == ids  # every result, in order
    assert len(received) - len(ids) <= WINDOW  # QoS 1: at most the unacknowledged ones again
    assert pub.connects == 2


def test_a_publisher_never_sends_a_row_before_an_earlier_one(broker, tmp_path):
    """The order holds when rows arrive while earlier ones are in flight (QoS 1 window)."""
    path = tmp_path / "cells.results.sqlite"
    log = LineLog(path)
    pub = MqttPublisher(path, settings(broker))
    pub.start()
    try:
        poll(lambda: pub.connected, what="connected")
        ids = []
        for i in range(300):
            ids.append(log.record(entry(i), i, 1))
            pub.wake()
        poll(lambda: pub.published_upto == ids[-1], timeout=60, what="all sent")
    finally:
        pub.stop()
        log.close()
    assert [m["payload"]["id"] for m in broker.messages()] == ids


@pytest.fixture(scope="module")
def mqtt_recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("line-mqtt")
    model = demo_model(tmp_path_factory.getbasetemp() / "line-demo")
    return make_recipe(folder, "cells", model, station={"mqtt_topic": TOPIC, "mqtt_qos": 1})


def test_okng_serve_publishes_each_plc_cycle_and_a_crash_while_the_broker_is_down_loses_nothing(
        broker, mqtt_recipe, tmp_path):
    """okng serve --mqtt: one message per PLC cycle with the PLC's part id and verdict. Then
    the broker dies, the line goes on, the station is SIGKILLed with results unsent, and
    restarts when the broker is back: every result arrives, in order."""
    port = free_port()
    args = (str(mqtt_recipe), "--images", *playlist(), "--modbus", f"127.0.0.1:{port}", "--mqtt",
            f"127.0.0.1:{broker.port}")
    served = Served(*args, log=tmp_path / "serve.log")
    seen = []
    try:
        plc = ModbusPlc(port)
        for part in range(1, 11):
            r, _ = run_cycle(plc, part)
            seen.append((part, "OK" if r["Ok"] else "NG"))
        poll(lambda: len(broker.messages()) >= 10, what="10 messages")
        broker.stop()
        for part in range(11, 21):
            r, _ = run_cycle(plc, part)
            seen.append((part, "OK" if r["Ok"] else "NG"))
        plc.close()
        served.kill()  # ten results logged, none published
        broker.start()
        served = Served(*args, log=tmp_path / "serve.log")
        poll(lambda: len({m["payload"]["id"] for m in broker.messages()}) >= 20, timeout=30, what="20 results")
    finally:
        served.stop()
    msgs = [m["payload"] for m in broker.messages() if m["topic"] == TOPIC]
    firsts = first_occurrences([m["id"] for m in msgs])
    by_id = {m["id"]: m for m in msgs}
    assert [(by_id[i]["part_id"], by_id[i]["verdict"]) for i in firsts] == seen
    assert all(by_id[i]["recipe"] == "cells" and len(by_id[i]["image_sha256"]) == 64 for i in firsts)
