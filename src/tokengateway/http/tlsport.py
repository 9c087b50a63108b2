"""A TLS port that answers a plain HTTP request with a clear 400 instead of a dead socket.

asyncio's `create_server(ssl=...)` starts the handshake on the first byte, so a client that
speaks plain HTTP to the HTTPS port sees its connection closed with no answer (curl: "Empty
reply from server"). `TlsPort` looks at the first byte first: a TLS record starts with
0x16 (handshake); anything else is answered `400` (nginx does the same) and closed, without
a byte of the request being parsed, routed or logged: nothing of a route or an API key can
come back.

A handshake goes on with the event loop's own `start_tls` (uvloop's when it runs), handed
the bytes already read through the TLS protocol's buffer interface, so no byte is lost and
the record layer is the same as `create_server(ssl=...)`'s. `start_tls` does not call
`connection_made` of the protocol it is given and returns only once the handshake ended,
while the client may have sent its first request with its last handshake message: a
stand-in protocol holds what arrives until the HTTP protocol takes the connection over.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import cast

__all__ = ["TlsPort"]

log = logging.getLogger("tokengateway.connections")

#: the content type of a TLS handshake record (RFC 8446, 5.1)
_HANDSHAKE = 0x16
#: how long a refused plain connection still reads and drops what the client sends, so that
#: closing with unread data does not reset the connection before the answer is read
LINGER = 1.0


class _Held(asyncio.Protocol):
    """Stands in for the HTTP protocol while `start_tls` finishes: keeps what arrives."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return True  # keep the transport open: the HTTP protocol decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class TlsPort(asyncio.Protocol):
    """One connection to a TLS port until its first bytes say what it speaks."""

    def __init__(
        self,
        make_protocol: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        timeout: float,
        plain_answer: bytes,
    ) -> None:
        self.make_protocol = make_protocol
        self.context = context
        self.timeout = timeout
        self.plain_answer = plain_answer
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.decided = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.loop.call_later(self.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.decided:
            return  # a refused plain client's remaining bytes: dropped
        self.decided = True
        transport = self.transport
        assert transport is not None
        if data[0] == _HANDSHAKE:
            if self.timer is not None:
                self.timer.cancel()
            transport.pause_reading()
            self.task = self.loop.create_task(self._handshake(transport, data))
            return
        transport.write(self.plain_answer)
        if transport.can_write_eof():
            transport.write_eof()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(LINGER, transport.close)

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _timed_out(self) -> None:
        if self.transport is not None and not self.decided:
            self.transport.close()  # nothing sent: a bare close, as the HTTP port does

    async def _handshake(self, transport: asyncio.Transport, first: bytes) -> None:
        held = _Held()
        # start_tls sets its TLS protocol on the transport, then schedules that protocol's
        # connection_made (which starts the handshake) and the transport's resume_reading:
        # `_feed`, scheduled first, hands it the bytes read here before either runs
        self.loop.call_soon(self._feed, transport, first)
        try:
            tls = await self.loop.start_tls(
                transport, held, self.context, server_side=True, ssl_handshake_timeout=self.timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            transport.abort()
            return
        if tls is None or held.lost:
            return
        protocol = self.make_protocol()
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        for data in held.data:
            protocol.data_received(data)
        if held.eof and not protocol.eof_received():
            tls.close()

    def _feed(self, transport: asyncio.Transport, data: bytes) -> None:
        protocol = cast(asyncio.BufferedProtocol, transport.get_protocol())
        if not hasattr(protocol, "buffer_updated"):  # uvloop's is not a BufferedProtocol subclass
            transport.abort()  # not the TLS protocol start_tls should have set: give up
            return
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
