"""Results to the plant's MQTT broker (paho-mqtt), one JSON message per inspection.

The outbox is the recipe's results log (:class:`.store.Outbox`): the publisher sends the rows
after its ``published`` mark, oldest first, and moves the mark over each row the broker has
acknowledged (QoS 1: PUBACK; QoS 0: written to the socket). So results made while the broker
is down, or before a crash, are sent in order when it is back; after a lost connection the
rows sent but not acknowledged are sent again (QoS 1 allows a duplicate; the message ``id``
tells them apart). One thread, one paho client per connection, driven by ``client.loop()``
here: paho's own reconnect and resend are not used, so nothing is resent behind our back.
Reconnects back off from ``backoff_min`` to ``backoff_max`` seconds (doubling, with jitter).

Message (topic and QoS per recipe: station settings ``mqtt_topic``, default
``okng/<recipe name>/results``, and ``mqtt_qos``, default 1)::

    {"id": 812, "station": "line-pc-3", "recipe": "cells", "part_id": 4711,
     "time": "2026-12-01T12:00:00.123Z", "score": 12.5, "verdict": "NG",
     "image_threshold": 10.0, "pixel_threshold": 20.0, "model_id": "cells.okng@20261201T090000",
     "image_sha256": "…", "image_path": "/line/in/4711.png", "error_code": 0, "error_text": ""}
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from ..results_log import LogEntry
from .store import Outbox

log = logging.getLogger(__name__)
WINDOW = 50  # messages in flight at once


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    topic: str
    qos: int = 1
    backoff_min: float = 0.5
    backoff_max: float = 5.0
    client_id: str = ""
    keepalive: int = 10


def message(entry: LogEntry, line: dict[str, Any], extra: dict[str, Any]) -> bytes:
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.time)) + f".{int(entry.time % 1 * 1000):03d}Z"
    body = {"id": entry.id, **extra, "part_id": line.get("part_id"), "time": iso, "score": entry.score,
            "verdict": entry.verdict, "image_threshold": entry.image_threshold,
            "pixel_threshold": entry.pixel_threshold, "model_id": entry.model_id, "image_sha256": entry.image_sha256,
            "image_path": entry.image_path, "error_code": line.get("error_code", 0),
            "error_text": line.get("error_text", "")}
    return json.dumps(body).encode()


class MqttPublisher:
    def __init__(self, log_path: str | Path, settings: MqttSettings, extra: dict[str, Any] | None = None) -> None:
        self.log_path, self.settings, self.extra = Path(log_path), settings, dict(extra or {})
        self.connected = False
        self.connects = 0
        self.published_upto = 0
        self.pending = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"broker": f"{s.host}:{s.port}", "topic": s.topic, "qos": s.qos, "connected": self.connected,
                "published_upto": self.published_upto, "pending": self.pending, "connects": self.connects}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.settings.topic}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A new row is in the log: send it now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        outbox = Outbox(self.log_path, f"mqtt:{self.settings.topic}")
        delay = self.settings.backoff_min
        try:
            while not self._stop.is_set():
                self.published_upto, self.pending = outbox.published_upto, outbox.count_pending()
                client = self._connect()
                if client is None:
                    wait = delay * (0.75 + 0.5 * random.random())
                    log.info("MQTT broker %s:%s unreachable; next try in %.1f s", self.settings.host,
                             self.settings.port, wait)
                    self._stop.wait(wait)
                    delay = min(delay * 2.0, self.settings.backoff_max)
                    continue
                delay = self.settings.backoff_min
                try:
                    self._pump(client, outbox)
                except Exception:  # noqa: BLE001 - e.g. the log busy or unreadable: retry, never die
                    log.exception("MQTT publisher: sending failed; reconnecting")
                    self._stop.wait(self.settings.backoff_min)
                finally:
                    self.connected = False
                    try:
                        client.disconnect()
                        client.loop(0.01)
                    except Exception:  # noqa: BLE001 - the socket may be gone already
                        pass
        finally:
            outbox.close()

    def _connect(self) -> mqtt.Client | None:
        s = self.settings
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=s.client_id, clean_session=True)
        client.max_inflight_messages_set(WINDOW)
        state = {"up": None}
        client.on_connect = lambda c, u, flags, rc, props: state.update(up=not rc.is_failure)
        client.on_disconnect = lambda c, u, flags, rc, props: state.update(up=False)
        acked: set[int] = set()
        client.on_publish = lambda c, u, mid, rc, props: acked.add(mid)
        client.user_data_set({"state": state, "acked": acked})
        try:
            client.connect(s.host, s.port, s.keepalive)
            deadline = time.monotonic() + 5.0
            while state["up"] is None and time.monotonic() < deadline:
                if client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
        except OSError:
            return None
        if not state["up"]:
            return None
        self.connected = True
        self.connects += 1
        log.info("MQTT connected to %s:%s", s.host, s.port)
        return client

    def _pump(self, client: mqtt.Client, outbox: Outbox) -> None:
        """Send the outbox in order until the connection drops or the publisher stops."""
        data = client.user_data_get()
        state, acked = data["state"], data["acked"]
        inflight: deque[tuple[int, int]] = deque()  # (mid, log id), in sending order
        last_sent = outbox.published_upto
        while not self._stop.is_set() and state["up"]:
            if len(inflight) < WINDOW:
                for entry, line in outbox.pending(after=last_sent, limit=WINDOW - len(inflight)):
                    info = client.publish(self.settings.topic, message(entry, line, self.extra), self.settings.qos)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        return
                    inflight.append((info.mid, entry.id))
                    last_sent = entry.id
            if client.loop(0.02 if inflight else 0.0) != mqtt.MQTT_ERR_SUCCESS:
                return
            done = None
            while inflight and inflight[0][0] in acked:  # the mark moves over the acknowledged prefix only
                mid, done = inflight.popleft()
                acked.discard(mid)
            if done is not None:
                outbox.mark_published(done)
                self.published_upto = done
            if not inflight:
                self.pending = outbox.count_pending()
                if not self.pending and self._wake.wait(0.25):
                    self._wake.clear()
