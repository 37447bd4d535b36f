"""Clients of the real processes: order load over HTTP, WebSocket watchers, a raw socket."""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import os
import random
import struct
import time
from typing import Any
from urllib.parse import urlparse

from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.websocket import WebSocketClosedError, websocket_connect

from tests.contract import check_message
from tests.helpers import AUTH_HEADERS, TEST_API_KEY, VALID_ORDER

# What one HTTP or WebSocket step may take before the client gives up on it. Only a
# bound on hanging: nothing here asserts on how long anything took.
REQUEST_TIMEOUT_SECS = 20.0
RECONNECT_DELAY_SECS = 0.2


def http_client(max_clients: int = 50) -> AsyncHTTPClient:
    """A client of the test's own (close it at the end)."""
    return AsyncHTTPClient(force_instance=True, max_clients=max_clients)


def random_order(rng: random.Random) -> dict[str, Any]:
    """A valid order; amounts vary so every order is a different trade."""
    return {**VALID_ORDER, "amount": round(rng.uniform(0.1, 50.0), 6)}


@dataclasses.dataclass
class Answer:
    code: int  # 599: no HTTP answer at all (connection refused or reset, timeout)
    body: Any
    content_type: str
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


async def post_order(
    http: AsyncHTTPClient,
    base_url: str,
    order: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Answer:
    try:
        response = await http.fetch(
            f"{base_url}/api/orders/execute",
            method="POST",
            body=json.dumps(order),
            headers={"Content-Type": "application/json", **AUTH_HEADERS, **(headers or {})},
            raise_error=False,
            request_timeout=REQUEST_TIMEOUT_SECS,
        )
    except (OSError, HTTPClientError):
        return Answer(599, None, "")
    content_type = response.headers.get("Content-Type", "")
    try:
        body = json.loads(response.body) if response.body else None
    except ValueError:
        body = response.body[:200]
    return Answer(response.code, body, content_type, dict(response.headers.get_all()))


async def post_orders(
    http: AsyncHTTPClient, base_url: str, count: int, *, concurrency: int = 20, seed: int = 1
) -> list[str]:
    """POST ``count`` valid orders, all expected to be accepted; their ids."""
    rng = random.Random(seed)
    orders = [random_order(rng) for _ in range(count)]
    ids: list[str] = []
    refused: collections.Counter[int] = collections.Counter()
    queue = collections.deque(orders)

    async def client() -> None:
        while queue:
            answer = await post_order(http, base_url, queue.popleft())
            if answer.code == 202:
                ids.append(answer.body["order_id"])
            else:
                refused[answer.code] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    assert not refused, f"orders refused: {dict(refused)}"
    return ids


# -- WebSocket watchers -------------------------------------------------------------------


@dataclasses.dataclass
class Watch:
    """What one client saw of one order, over however many connections it took."""

    order_id: str
    # The order's statuses, each once: the client drops seq <= the last it saw, as a
    # reconnecting client must (the server replays the history on every connect).
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    connections: int = 0
    connect_failures: int = 0
    replayed: int = 0  # messages dropped by that rule after a reconnect
    # Server-side faults: within one connection, seqs not 1, 2, 3... / a gap overall.
    out_of_order: int = 0
    gaps: int = 0
    close_codes: list[int | None] = dataclasses.field(default_factory=list)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def last_seq(self) -> int:
        return self.messages[-1]["seq"] if self.messages else 0

    @property
    def finished(self) -> bool:
        return bool(self.messages) and self.messages[-1]["status"] in ("confirmed", "failed")

    @property
    def statuses(self) -> list[str]:
        return [m["status"] for m in self.messages]

    def complete(self) -> bool:
        """Seq 1..n, each status once, ending in a terminal status."""
        seqs = [m["seq"] for m in self.messages]
        return (
            self.finished
            and seqs == list(range(1, len(seqs) + 1))
            and len(set(self.statuses)) == len(self.statuses)
        )


async def watch(
    order_id: str,
    urls: list[str],
    *,
    reconnect: bool = True,
    timeout: float = 60.0,
    connected: asyncio.Event | None = None,
) -> Watch:
    """Follow ``order_id`` to its end, reconnecting (to the next URL in turn) when a
    connection ends before the order does. ``connected`` is set once the first
    message has arrived."""
    seen = Watch(order_id)
    deadline = time.monotonic() + timeout
    index = 0
    while time.monotonic() < deadline:
        url = urls[index % len(urls)]
        try:
            ws = await asyncio.wait_for(websocket_connect(url), REQUEST_TIMEOUT_SECS)
        except (OSError, HTTPClientError, TimeoutError, WebSocketClosedError):
            seen.connect_failures += 1
            index += 1
            await asyncio.sleep(RECONNECT_DELAY_SECS)
            continue
        seen.connections += 1
        try:
            await ws.write_message(order_id)
            expected = 1
            while True:
                remaining = max(0.1, deadline - time.monotonic())
                raw = await asyncio.wait_for(ws.read_message(), remaining)
                if raw is None:
                    break
                message = check_message(raw)  # every message valid against its schema
                if "error" in message:
                    seen.errors.append(message)
                    continue
                if connected is not None:
                    connected.set()
                seq = message["seq"]
                if seq != expected:
                    seen.out_of_order += 1
                expected = seq + 1
                if seq <= seen.last_seq:
                    seen.replayed += 1
                    continue
                if seq != seen.last_seq + 1:
                    seen.gaps += 1
                seen.messages.append(message)
        except (WebSocketClosedError, TimeoutError):
            pass
        finally:
            seen.close_codes.append(ws.close_code)
            ws.close()
        if seen.finished or not reconnect:
            return seen
        index += 1
        await asyncio.sleep(RECONNECT_DELAY_SECS)
    return seen


# -- a raw WebSocket, for frames a proper client library would never send -------------------


class RawWebSocket:
    """A hand-rolled RFC 6455 client over a plain TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, url: str, *, origin: str | None = None, rcvbuf: int | None = None
    ) -> RawWebSocket:
        """Open and upgrade; ``rcvbuf`` shrinks the socket's receive buffer (bytes)."""
        parsed = urlparse(url)
        assert parsed.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
        reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
        if rcvbuf is not None:
            import socket

            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET {parsed.path} HTTP/1.1\r\n"
            f"Host: {parsed.hostname}:{parsed.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if origin is not None:
            head += f"Origin: {origin}\r\n"
        writer.write((head + "\r\n").encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_SECS)
        status = response.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            writer.close()
            raise ConnectionError(f"upgrade refused: {response[:300]!r}")
        return cls(reader, writer)

    @staticmethod
    def frame(
        opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
    ) -> bytes:
        """One frame; ``rsv`` is the three reserved bits (0-7)."""
        first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
        length = len(payload)
        mask_bit = 0x80 if masked else 0
        if length < 126:
            header = struct.pack("!BB", first, mask_bit | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            header = struct.pack("!BBQ", first, mask_bit | 127, length)
        if not masked:
            return header + payload
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return header + mask + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send(self.frame(0x1, text.encode()))

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next frame from the server (opcode, payload); None at EOF."""
        try:
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return first & 0x0F, payload

    async def read_until_closed(self, timeout: float = REQUEST_TIMEOUT_SECS) -> RawClose:
        """Every frame up to the close frame, or up to EOF without one."""
        texts: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return RawClose(texts, None, eof=False, timed_out=True)
            try:
                got = await asyncio.wait_for(self.read_frame(), remaining)
            except TimeoutError:
                return RawClose(texts, None, eof=False, timed_out=True)
            if got is None:
                return RawClose(texts, None, eof=True)
            opcode, payload = got
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return RawClose(texts, code, eof=False)
            if opcode == 0x1:
                texts.append(payload.decode())

    def close(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


@dataclasses.dataclass
class RawClose:
    texts: list[str]
    code: int | None  # the close frame's code, if one came
    eof: bool  # the connection ended without a close frame
    timed_out: bool = False


def with_api_key(request: bytes, api_key: str | None) -> bytes:
    """``request`` with an Authorization line for ``api_key`` after its request line,
    if it is for an order route (/api/orders...) and has none of its own."""
    line, sep, rest = request.partition(b"\r\n")
    parts = line.split(b" ")
    if (
        api_key is None or not sep or len(parts) < 2 or not parts[1].startswith(b"/api/orders")
        or b"\nauthorization:" in request.split(b"\r\n\r\n", 1)[0].lower()
    ):
        return request
    return line + sep + f"Authorization: Bearer {api_key}\r\n".encode() + rest


async def raw_http(
    host: str, port: int, request: bytes, timeout: float = REQUEST_TIMEOUT_SECS,
    *, api_key: str | None = TEST_API_KEY,
) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (with the tests' API key added, see with_api_key: None
    sends none); the answer's status, headers (lower-case names) and body."""
    assert host in ("127.0.0.1", "localhost", "::1"), "loopback only"
    request = with_api_key(request, api_key)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            raw_head = await reader.readuntil(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
