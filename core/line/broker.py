"""A local MQTT broker for tests, benchmarks and a bench-top line: amqtt (pure Python,
``pip install amqtt``; no system package), run as a subprocess so it can be killed and
restarted like a real broker. Anonymous clients, MQTT 3.1.1, one TCP listener.

    >>> with LocalBroker(1883) as broker:   # python -m amqtt.scripts.broker_script -c <config>
    ...     broker.stop(); broker.start()   # an outage

``record=True`` also appends every message the broker receives to ``broker.received``
(JSON lines, in arrival order, across restarts): what reached the broker, independent of
whether a subscriber happened to be connected at that moment (a restarted broker has no
subscriptions until its subscribers come back).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CONFIG = """---
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""
_RECORDER = """  core.line.broker.RecordingPlugin:
    path: {path}
"""


def _recording_plugin():
    from dataclasses import dataclass

    from amqtt.plugins.base import BasePlugin

    class RecordingPlugin(BasePlugin):
        """Appends each received message to a file (written at once, so in arrival order)."""

        @dataclass
        class Config:
            path: str = ""

        async def on_broker_message_received(self, *, client_id: str, message) -> None:
            line = json.dumps({"client": client_id, "topic": message.topic, "payload": message.data.decode()})
            with open(self.config.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    return RecordingPlugin


def __getattr__(name: str):  # the plugin class only when the broker loads it: amqtt is a test tool
    if name == "RecordingPlugin":
        return _recording_plugin()
    raise AttributeError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalBroker:
    def __init__(self, port: int | None = None, record: bool = False) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="okng-broker-")
        self.config = Path(self._dir.name) / "broker.yaml"
        self.received = Path(self._dir.name) / "received.jsonl"
        text = _CONFIG.format(port=self.port)
        if record:
            text += _RECORDER.format(path=self.received)
        self.config.write_text(text)

    def messages(self) -> list[dict]:
        """Every message received so far (record=True), payloads decoded from JSON."""
        if not self.received.exists():
            return []
        rows = [json.loads(line) for line in self.received.read_text(encoding="utf-8").splitlines() if line]
        return [dict(r, payload=json.loads(r["payload"])) for r in rows]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker; returns once it accepts connections."""
        root = str(Path(__file__).resolve().parents[2])  # the recorder plugin is imported by the broker
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the MQTT test broker did not start on port {self.port}")
            time.sleep(0.05)  # a starting process has no event to wait on

    def stop(self) -> None:
        """Kill the broker (SIGKILL: an outage, not a goodbye) and wait for it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
