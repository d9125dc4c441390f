"""The handshake as an OPC UA server (asyncua): the station is the server, the PLC a client.

Endpoint ``opc.tcp://HOST:PORT/okng/`` (no security: a line network; put it behind the
plant's firewall), namespace ``urn:okng-station:line``, one object ``Station`` whose
variables are the signals of :mod:`.signals`, node ids ``ns=<idx>;s=Station.<Name>``.
Types: booleans Boolean, RecipeIndex/ActiveRecipe/Heartbeat/ErrorCode UInt16, PartId
UInt32, Score Double, ScoreX1000 Int32, ErrorText String. A client writes with the node's
own type (asyncua: ``ua.Variant(3, ua.VariantType.UInt16)``); the station's variables are
not writable. Values change on the server's own loop, in the order the handshake changed
them, so a client that sees ResultReady=1 reads the result that goes with it.
"""
from __future__ import annotations

import asyncio
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType

from .handshake import Handshake
from .server_thread import ServerThread
from .signals import BY_NAME, SIGNALS, Signal

NAMESPACE = "urn:okng-station:line"
_TYPES = {"bool": ua.VariantType.Boolean, "uint16": ua.VariantType.UInt16, "uint32": ua.VariantType.UInt32,
          "int32": ua.VariantType.Int32, "float": ua.VariantType.Double, "text": ua.VariantType.String}


def _variant(sig: Signal, value: Any) -> ua.Variant:
    return ua.Variant(value, _TYPES[sig.kind])


class OpcUaLink(ServerThread):
    thread_name = "line-opcua"

    def __init__(self, handshake: Handshake, host: str = "0.0.0.0", port: int = 4840) -> None:
        super().__init__()
        self.handshake, self.host, self.port = handshake, host, port
        self.endpoint = f"opc.tcp://{host}:{port}/okng/"
        self._stopping: asyncio.Event | None = None
        self._queue: asyncio.Queue | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._names: dict[ua.NodeId, str] = {}
        self._server: Server | None = None

    def where(self) -> str:
        return f"OPC UA server on {self.endpoint}"

    def describe(self) -> dict[str, Any]:
        bserver = getattr(self._server, "bserver", None)
        return {"protocol": "OPC UA", "endpoint": self.endpoint,
                "clients": len(bserver.clients) if bserver is not None else 0}

    def stop(self) -> None:
        if self._stopping is not None:
            stopping = self._stopping
            self._stop_on_loop(lambda loop: loop.call_soon_threadsafe(stopping.set))

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()  # _changed posts to it from the first change on
        self._stopping, self._queue = asyncio.Event(), asyncio.Queue()
        self._server = server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("OK/NG Station")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NAMESPACE)
        station = await server.nodes.objects.add_object(ua.NodeId("Station", idx), ua.QualifiedName("Station", idx))
        values = self.handshake.snapshot()
        for sig in SIGNALS:
            node = await station.add_variable(ua.NodeId(f"Station.{sig.name}", idx), ua.QualifiedName(sig.name, idx),
                                              _variant(sig, values[sig.name]))
            if sig.plc_writable:
                await node.set_writable()
            self._nodes[sig.name] = node.nodeid
            self._names[node.nodeid] = sig.name
        server.subscribe_server_callback(CallbackType.PostWrite, self._post_write)
        async with server:
            self.handshake.add_listener(self._changed)
            await self._publish(self.handshake.snapshot())  # whatever changed while the server started
            self._serving()
            pusher = asyncio.create_task(self._push())
            try:
                await self._stopping.wait()
            finally:
                self.handshake.remove_listener(self._changed)
                pusher.cancel()

    def _changed(self, changes: dict[str, Any]) -> None:
        """Handshake listener (any thread): hand the changes to the server's loop, in order."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, changes)

    async def _push(self) -> None:
        while True:
            await self._publish(await self._queue.get())

    async def _publish(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            await self._server.write_attribute_value(self._nodes[name], ua.DataValue(_variant(BY_NAME[name], value)))

    async def _post_write(self, event: Any, _dispatcher: Any) -> None:
        """A client wrote: pass the PLC's signals to the handshake."""
        for wv, status in zip(event.request_params.NodesToWrite, event.response_params or []):
            name = self._names.get(wv.NodeId)
            if name is None or wv.AttributeId != ua.AttributeIds.Value or not status.is_good():
                continue
            self.handshake.plc_write(name, wv.Value.Value.Value)
