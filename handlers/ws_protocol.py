"""Every override of Tornado's WebSocket internals, in one place (tornado is pinned,
6.6.1; tests/test_fuzz.py and tests/test_client_seat.py check each behaviour).
handlers/http1.py holds the same for the HTTP/1.1 connection.
"""

from __future__ import annotations

from asyncio import Future
from collections.abc import Callable

from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from handlers.base import override


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


# What a socket's request and response headers become once the handshake is done
# (never written: a detached handler's header methods raise).
_NO_HEADERS = HTTPHeaders()


def shed_handshake_state(handler: WebSocketHandler) -> None:
    """Drop what a WebSocket handler holds only for its handshake, once the 101 is
    answered and the stream detached (``open`` runs then): the answer's headers, the
    template namespace, and the request's headers (emptied in place: Tornado's ``get``
    frame, which lasts as long as the socket, and its HTTP/1.1 connection refer to the
    same object). The request keeps its method, path and address (the access log, the
    account feed's client address)."""
    request_headers = handler.request.headers
    for name in list(request_headers):  # emptied in place: Tornado's frames refer to it
        del request_headers[name]
    handler._headers = _NO_HEADERS
    handler.__dict__.pop("ui", None)


class StrictWebSocketHandler(WebSocketHandler):
    """A WebSocketHandler speaking StrictWebSocketProtocol, whose cross-origin check is
    its ``check_origin`` alone."""

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
