"""The station on a production line: a PLC handshake over OPC UA and Modbus TCP, results
published to MQTT, ``okng serve`` without a window. No Qt here.

:mod:`.signals` is the signal map both protocols serve, :mod:`.handshake` the transport-free
protocol state machine, :mod:`.store` the results log rows the line adds (part id, ack,
published marker), :mod:`.service` the wiring. The protocol libraries are an optional extra
(``pip install okng-station[line]``): :func:`require` says what is missing, and nothing in
``okng score`` imports this package.
"""
from __future__ import annotations

import importlib

from ..errors import OkngError

#: import name -> pip requirement
LINE_PACKAGES = {"asyncua": "asyncua", "pymodbus": "pymodbus", "paho": "paho-mqtt"}


def require(*modules: str) -> None:
    """Raise a clear error naming what to install when a protocol library is missing."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(LINE_PACKAGES[m])
    if missing:
        raise OkngError(f"the line links need {', '.join(missing)}: pip install 'okng-station[line]' "
                        f"(or pip install {' '.join(missing)})")
