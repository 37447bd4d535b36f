"""A minimal HTTP/1.1 client over asyncio protocols, for load generation.

Only what the bench needs: keep-alive connections to a loopback address carrying one
request at a time, responses framed by ``Content-Length`` (Tornado always sends one
for a finished response). It costs a few tens of microseconds per request, far less
than a general-purpose client, so the generator is rarely the bottleneck.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from typing import cast

# Called once per request with (status, body); status -1 means the connection was
# lost before a complete response arrived.
ResponseCallback = Callable[[int, bytes], None]
CONNECTION_LOST = -1

_HEADER_END = b"\r\n\r\n"


def require_loopback(host: str) -> None:
    """Refuse any target that is not a loopback address: the bench never sends elsewhere."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the bench only sends traffic to loopback addresses, not {host}")


def build_request(
    method: str, host: str, port: int, path: str, body: bytes = b"",
    content_type: str = "application/json", headers: Sequence[str] = (),
) -> bytes:
    """The full bytes of one request; built once and re-sent as is. ``headers``:
    more header lines, ``Name: value`` each."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{line}\r\n" for line in headers)
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("ascii") + body


class HTTPConnection(asyncio.Protocol):
    """One keep-alive connection; ``send`` one request, get one callback."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._callback: ResponseCallback | None = None

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    @property
    def busy(self) -> bool:
        return self._callback is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes, callback: ResponseCallback) -> None:
        """Write ``request``; ``callback`` runs when its response (or a loss) arrives."""
        if self._callback is not None:
            raise RuntimeError("one request at a time per connection")
        if self.transport is None:
            callback(CONNECTION_LOST, b"")
            return
        self._callback = callback
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._callback is not None and self._parse_one():
            pass

    def _parse_one(self) -> bool:
        buffer = self._buffer
        end = buffer.find(_HEADER_END)
        if end < 0:
            return False
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        total = end + len(_HEADER_END) + length
        if len(buffer) < total:
            return False
        body = bytes(buffer[end + len(_HEADER_END) : total])
        del buffer[:total]
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(status, body)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(CONNECTION_LOST, b"")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> HTTPConnection:
    """Open one connection (loopback only). asyncio sets TCP_NODELAY on it."""
    require_loopback(host)
    loop = asyncio.get_running_loop()
    _transport, protocol = await loop.create_connection(HTTPConnection, host, port)
    return protocol


async def request(conn: HTTPConnection, raw: bytes) -> tuple[int, bytes]:
    """Send one request on ``conn`` and wait for its (status, body)."""
    future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    def done(status: int, body: bytes) -> None:
        if not future.done():
            future.set_result((status, body))

    conn.send(raw, done)
    return await future
