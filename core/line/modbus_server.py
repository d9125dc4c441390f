"""The handshake as a Modbus TCP server (pymodbus): the PLC is the client (master).

Every request is answered from the handshake's values at that moment (no copy to keep in
step): coils 0-6 are the booleans, holding registers 0-42 the numbers, ErrorText and ResultRecipe, at the
addresses of :mod:`.signals` (README "Connecting a line"). Function codes 2 and 4 (discrete
inputs, input registers) read the same tables, for PLCs that keep outputs there. The PLC may
write Trigger, ResultAck (coils 0, 1), RecipeIndex (register 0) and PartId (registers 4-5,
high word first; both in one write, or either half); a write touching a station signal or an
unmapped address is refused whole with exception 2 (illegal data address). Any unit id.
"""
from __future__ import annotations

import asyncio
import struct
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer

from .handshake import Handshake
from .server_thread import ServerThread
from .signals import COILS, ERROR_TEXT_REGISTERS, N_COILS, N_REGISTERS, REGISTERS, Signal, plc_text

_BIT_CODES = {1, 2, 5, 15}  # read coils, read discrete inputs, write coil(s)
_REGISTER_CODES = {3, 4, 6, 16, 22, 23}
_COIL_AT = {s.address: s for s in COILS}
_REGISTER_AT = {s.address + i: s for s in REGISTERS for i in range(s.registers)}


def encode(sig: Signal, value: Any) -> list[int]:
    """A signal's value as 16-bit registers, high word first."""
    if sig.kind == "uint16":
        return [int(value) & 0xFFFF]
    if sig.kind in ("uint32", "int32", "float"):
        fmt = {"uint32": ">I", "int32": ">i", "float": ">f"}[sig.kind]
        return list(struct.unpack(">HH", struct.pack(fmt, value)))
    n = 2 * ERROR_TEXT_REGISTERS
    raw = plc_text(str(value), n).encode("ascii", "replace")[:n].ljust(n, b"\0")
    return list(struct.unpack(f">{ERROR_TEXT_REGISTERS}H", raw))


def decode(sig: Signal, registers: list[int]) -> Any:
    if sig.kind == "uint16":
        return registers[0]
    if sig.kind in ("uint32", "int32", "float"):
        fmt = {"uint32": ">I", "int32": ">i", "float": ">f"}[sig.kind]
        return struct.unpack(fmt, struct.pack(">HH", *registers))[0]
    return struct.pack(f">{len(registers)}H", *registers).rstrip(b"\0").decode("ascii", "replace")


def register_image(values: dict[str, Any]) -> list[int]:
    regs = [0] * N_REGISTERS
    for sig in REGISTERS:
        regs[sig.address : sig.address + sig.registers] = encode(sig, values[sig.name])
    return regs


class HandshakeContext(ModbusServerContext):
    """A pymodbus datastore whose memory is the handshake (pymodbus 3.x's context interface)."""

    def __init__(self, handshake: Handshake) -> None:  # no super(): no blocks of its own to build
        self.handshake = handshake
        self.simdevices: list = []
        self.old_simulator = True  # pymodbus: use this object's async_getValues/async_setValues as is

    def device_ids(self) -> list[int]:
        return [0]

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1):
        values = self.handshake.snapshot()
        if func_code in _BIT_CODES:
            if address < 0 or address + count > N_COILS:
                return ExcCodes.ILLEGAL_ADDRESS
            return [bool(values[_COIL_AT[a].name]) for a in range(address, address + count)]
        if func_code in _REGISTER_CODES:
            if address < 0 or address + count > N_REGISTERS:
                return ExcCodes.ILLEGAL_ADDRESS
            return register_image(values)[address : address + count]
        return ExcCodes.ILLEGAL_FUNCTION

    async def async_setValues(self, device_id: int, func_code: int, address: int, values) -> ExcCodes | None:
        values = list(values)
        if func_code in _BIT_CODES:
            sigs = [_COIL_AT.get(a) for a in range(address, address + len(values))]
            if any(s is None or not s.plc_writable for s in sigs):
                return ExcCodes.ILLEGAL_ADDRESS
            for sig, v in zip(sigs, values):
                self.handshake.plc_write(sig.name, bool(v))
            return None
        if func_code in _REGISTER_CODES:
            return self._write_registers(address, [int(v) for v in values])
        return ExcCodes.ILLEGAL_FUNCTION

    def _write_registers(self, address: int, values: list[int]) -> ExcCodes | None:
        touched: dict[str, Signal] = {}
        for a in range(address, address + len(values)):
            sig = _REGISTER_AT.get(a)
            if sig is None or not sig.plc_writable:
                return ExcCodes.ILLEGAL_ADDRESS
            touched[sig.name] = sig
        regs = register_image(self.handshake.snapshot())  # a half-written 32-bit value keeps its other half
        regs[address : address + len(values)] = values
        for sig in touched.values():
            self.handshake.plc_write(sig.name, decode(sig, regs[sig.address : sig.address + sig.registers]))
        return None


class ModbusLink(ServerThread):
    thread_name = "line-modbus"

    def __init__(self, handshake: Handshake, host: str = "0.0.0.0", port: int = 502) -> None:
        super().__init__()
        self.handshake, self.host, self.port = handshake, host, port
        self.clients = 0  # connected PLCs (TCP connections)
        self._server: ModbusTcpServer | None = None

    def where(self) -> str:
        return f"Modbus server on {self.host}:{self.port}"

    def describe(self) -> dict[str, Any]:
        return {"protocol": "Modbus TCP", "endpoint": f"{self.host}:{self.port}", "clients": self.clients}

    def stop(self) -> None:
        if self._server is not None:
            server = self._server
            self._stop_on_loop(lambda loop: asyncio.run_coroutine_threadsafe(server.shutdown(), loop))

    def _connected(self, up: bool) -> None:
        self.clients = max(0, self.clients + (1 if up else -1))

    async def _serve(self) -> None:
        self._server = ModbusTcpServer(HandshakeContext(self.handshake), address=(self.host, self.port),
                                       trace_connect=self._connected)
        await self._server.serve_forever(background=True)
        self._serving()
        await self._server.serving
