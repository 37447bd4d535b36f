"""WebSocket /api/orders/status: the client sends an order id, then receives its statuses."""

from __future__ import annotations

import base64
import binascii
import logging
from asyncio import Future
from collections.abc import Callable
from typing import Any

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.websocket import (
    WebSocketClosedError,
    WebSocketHandler,
    WebSocketProtocol,
    WebSocketProtocol13,
)

from engine.core import strict_json
from engine.core.connections import REDIS_DOWN_ERRORS
from engine.web.services import Services
from engine.web.updates import Subscription
from handlers.base import APIError, JSONErrors, origin_allowed, override
from handlers.orders import parse_order_id

logger = logging.getLogger(__name__)

# Close codes. 4400/4404 mirror HTTP's 400/404 in the application range (4000-4999).
CLOSE_FINISHED = 1000
CLOSE_GOING_AWAY = 1001  # this web process is shutting down: reconnect (to another)
CLOSE_INTERNAL_ERROR = 1011
CLOSE_UNAVAILABLE = 1013  # "try again later" (RFC 6455 registry)
CLOSE_BAD_ID = 4400
CLOSE_UNKNOWN_ORDER = 4404
CLOSE_TIMEOUT = 4408


_HANDSHAKE_ERRORS = {400: "bad_handshake", 403: "origin_not_allowed", 426: "upgrade_required"}


def valid_websocket_key(key: str | None) -> bool:
    """RFC 6455 section 4.2.1, item 5: Sec-WebSocket-Key is the base64 encoding of a
    16-byte value (24 characters, the last two ``==``). A key sent twice arrives
    joined by a comma, and fails too."""
    if key is None or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def _quiet_write_result(future: Future[None]) -> None:
    """Retrieve a write's outcome: a client that has gone away fails the write with
    WebSocketClosedError, which is normal (on_close says it once), and a future whose
    exception nobody retrieves is logged as an ERROR with a traceback."""
    if not future.cancelled():
        future.exception()


def _valid_close_payload(data: bytes) -> bool:
    """RFC 6455 5.5.1 and 7.4: empty, or a code a peer may send plus a UTF-8 reason."""
    if not data:
        return True
    if len(data) == 1:
        return False
    code = int.from_bytes(data[:2], "big")
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        return False
    try:
        data[2:].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _frame_header_error(
    header: bytes, *, deflate: bool, in_fragmented_message: bool
) -> str | None:
    """What is wrong with a client frame's 2-byte header (RFC 6455 5.2-5.5), if anything."""
    first, second = header[0], header[1]
    final, rsv, opcode = first & 0x80, first & 0x70, first & 0x0F
    if deflate and opcode != 0x0:
        rsv &= ~0x40  # RSV1 marks a compressed message (RFC 7692)
    if rsv:
        return "reserved bits set"
    if opcode not in (0x0, 0x1, 0x2, 0x8, 0x9, 0xA):
        return "reserved opcode"
    if opcode & 0x8 and (not final or (second & 0x7F) >= 126):
        return "control frames must be final and at most 125 bytes"
    if opcode == 0x0 and not in_fragmented_message:
        return "continuation frame with nothing to continue"
    if opcode in (0x1, 0x2) and in_fragmented_message:
        return "new message inside a fragmented one"
    if not second & 0x80:
        return "client frames must be masked"
    return None


class StrictWebSocketProtocol(WebSocketProtocol13):
    """Tornado's protocol, failing a connection with its RFC 6455 close code.

    Tornado drops the TCP connection without a close frame on invalid UTF-8 (1007)
    and on every protocol violation (1002): reserved bits or opcodes, a fragmented or
    oversized control frame, a stray continuation; it accepts unmasked frames from a
    client, which RFC 6455 5.1 says the server must refuse, and echoes any close code,
    even one a peer may not send. Each frame's header is checked here first, so
    Tornado's own silent drop is left for what is not the client's fault (a handler
    error, a shutdown). These hooks are Tornado internals (pinned: tornado==6.6.1);
    tests/test_fuzz.py checks each code.
    """

    _at_frame_header = False

    @override
    async def _receive_frame(self) -> None:
        self._at_frame_header = True
        await super()._receive_frame()

    @override
    async def _read_bytes(self, n: int) -> bytes:
        data = await super()._read_bytes(n)
        if self._at_frame_header:  # the first read of a frame is its 2-byte header
            self._at_frame_header = False
            error = _frame_header_error(
                data,
                deflate=self._decompressor is not None,
                in_fragmented_message=self._fragmented_message_buffer is not None,
            )
            if error is not None:
                self._fail(1002, error)
        return data

    @override
    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if opcode == 0x8 and not self.client_terminated and not _valid_close_payload(data):
            # Tornado would echo any code back (RFC 6455 7.4 allows only some).
            self.client_terminated = True
            self.close(1002, "invalid close frame")
            return None
        if opcode == 0x1 and not self._frame_compressed:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(1007, "invalid UTF-8")
                self._abort()
                return None
        return super()._handle_message(opcode, data)

    def _fail(self, code: int, reason: str) -> None:
        """Send the close frame, drop the connection, end Tornado's receive loop."""
        self.close(code, reason)
        self._abort()
        raise StreamClosedError()  # _receive_frame_loop takes this as a closed stream


class OrderStatusSocket(WebSocketHandler, JSONErrors):
    """Streams one order's statuses: history first, then live, then close on a terminal one."""

    services: Services

    @override
    def initialize(self, services: Services) -> None:
        self.services = services
        self.subscription: Subscription | None = None
        self._claimed = False
        self._first_message_timer: object | None = None
        self._opened = False

    @override
    async def get(self, *args: Any, **kwargs: Any) -> None:
        # Tornado answers a plain GET (no Upgrade) with a text/plain 400; ours is JSON.
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise APIError(
                400, "websocket_required", "connect with a WebSocket client (Upgrade: websocket)"
            )
        # Tornado takes any key; a client whose key is malformed is not following
        # RFC 6455 and would get an accept value it cannot check.
        if not valid_websocket_key(self.request.headers.get("Sec-WebSocket-Key")):
            raise APIError(
                400,
                "bad_handshake",
                "Sec-WebSocket-Key must be sent once, as the base64 of 16 bytes (RFC 6455 4.2.1)",
            )
        await super().get(*args, **kwargs)

    async def head(self, *args: Any, **kwargs: Any) -> None:
        """HEAD: as a GET without Upgrade would be answered, with no body."""
        raise APIError(
            400, "websocket_required", "connect with a WebSocket client (Upgrade: websocket)"
        )

    @override
    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        # Tornado refuses a bad handshake (403 foreign origin, 400 bad headers, 426
        # unsupported version) with a text body; answer JSON like every other error.
        status = self.get_status()
        if (
            status >= 400
            and not self._headers.get("Content-Type", "").startswith("application/json")
        ):
            message = chunk if isinstance(chunk, str) and chunk else self._reason
            self.set_header("Content-Type", "application/json")
            error = _HANDSHAKE_ERRORS.get(status, "bad_request")
            chunk = strict_json.dumps({"error": error, "message": message})
        return super().finish(chunk)

    @override
    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        default = super().get_websocket_protocol()
        if not isinstance(default, WebSocketProtocol13):
            return default
        return StrictWebSocketProtocol(self, False, default.params)

    @override
    def _check_cross_origin(self, check: Callable[[str], bool]) -> str | None:
        # Tornado 6.6's own check (a Tornado internal) lets an Origin equal to Host,
        # or Sec-Fetch-Site: same-origin, through without asking check_origin: both
        # are what a DNS-rebinding page presents. It also raises on a malformed
        # Origin (a 500). The service's rule alone decides: check_origin.
        origin = self.request.headers.get("Origin")
        if origin is None or check(origin):
            return None
        return f"Origin {origin[:100]!r} not allowed"

    @override
    def check_origin(self, origin: str) -> bool:
        # Browsers send Origin; other clients usually don't, and Tornado only calls
        # this when one is present. Same-origin is always allowed.
        return origin_allowed(origin, self.request, self.services.config)

    @override
    def open(self, *args: str, **kwargs: str) -> None:
        self._opened = True
        self.services.open_sockets.add(self)
        self.services.metrics.websockets.inc()
        self._first_message_timer = IOLoop.current().call_later(
            self.services.config.ws_first_message_timeout_secs, self._on_first_message_timeout
        )

    @override
    async def on_message(self, message: str | bytes) -> None:
        if self._claimed:
            return  # one order per socket; later messages are ignored
        self._claimed = True
        self._cancel_timer()
        order_id = parse_order_id(message) if isinstance(message, str) else None
        if order_id is None:
            self._fail(CLOSE_BAD_ID, "invalid_order_id", "send the order id (a UUID) as plain text")
            return
        store, hub = self.services.store, self.services.hub
        try:
            if not await store.exists(order_id):
                self._fail(CLOSE_UNKNOWN_ORDER, "not_found", f"no order {order_id}", order_id)
                return
            if self.ws_connection is None:
                return  # the client left while we looked
            self.subscription = hub.subscribe(order_id, self._send)
            await self.subscription.sync()
        except REDIS_DOWN_ERRORS as exc:
            logger.warning("status socket for %s: Redis unavailable: %s", order_id, exc)
            self._fail(CLOSE_UNAVAILABLE, "unavailable", "order updates are unavailable; retry shortly")
        except Exception:
            # A bug or unexpected data: say so (Tornado would drop the connection
            # without a word), and keep the details in the log.
            logger.exception("status socket for %s failed", order_id)
            self._fail(CLOSE_INTERNAL_ERROR, "internal_error", "order updates failed; retry shortly")

    def _write(self, data: str | bytes) -> bool:
        """Send one text message; False if the client has gone (nothing to do then)."""
        try:
            future = self.write_message(data if isinstance(data, str) else data.decode())
        except WebSocketClosedError:
            return False
        future.add_done_callback(_quiet_write_result)
        return True

    def _send(self, data: str, terminal: bool) -> None:
        if self._write(data) and terminal:
            self.close(CLOSE_FINISHED, "order finished")

    def _fail(self, code: int, error: str, message: str, order_id: str | None = None) -> None:
        body: dict[str, Any] = {"error": error, "message": message}
        if order_id:
            body["order_id"] = order_id
        if self._write(strict_json.dumps(body)):
            self.close(code, message[:120])

    def _on_first_message_timeout(self) -> None:
        self._first_message_timer = None
        if not self._claimed:
            self._claimed = True
            self._fail(CLOSE_TIMEOUT, "timeout", "no order id received in time")

    def _cancel_timer(self) -> None:
        if self._first_message_timer is not None:
            IOLoop.current().remove_timeout(self._first_message_timer)
            self._first_message_timer = None

    @override
    def on_close(self) -> None:
        self._cancel_timer()
        if self._opened:
            self._opened = False
            self.services.open_sockets.discard(self)
            self.services.metrics.websockets.dec()
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None
