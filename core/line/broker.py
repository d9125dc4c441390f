"""A local MQTT broker for tests, benchmarks and a bench-top line: amqtt (pure Python,
``pip install amqtt``; no system package), run as a subprocess so it can be killed and
restarted like a real broker. Anonymous clients, MQTT 3.1.1, one TCP listener.

    >>> with LocalBroker(1883) as broker:   # python -m amqtt.scripts.broker_script -c <config>
    ...     broker.stop(); broker.start()   # an outage
"""
from __future__ import annotations

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
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="okng-broker-")
        self.config = Path(self._dir.name) / "broker.yaml"
        self.config.write_text(_CONFIG.format(port=self.port))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker; returns once it accepts connections."""
        self.process = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
