"""Every override of Tornado's WebSocket internals, in one place (tornado is pinned,
6.6.1; tests/test_fuzz.py and tests/test_client_seat.py check each behaviour).
handlers/http1.py holds the same for the HTTP/1.1 connection.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import math
import sys
import weakref
from asyncio import Future
from collections.abc import Callable
from typing import Any

from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from handlers.base import override

logger = logging.getLogger(__name__)


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

    It also keeps less for as long as a socket is open (8 KiB of Python objects
    instead of 17, docs/benchmarks.md): one Pinger for every socket's keep-alive, the
    frame loop as a task of its own, and an attribute set that Python shares among
    instances (tests/test_status_ws.py checks what an open socket keeps).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set here, with Tornado's own attributes, not first on the first frame: an
        # attribute added later, or a 30th, makes Python give the object a dict of its
        # own (1.6 KiB) instead of the one its class's instances share keys through.
        self._at_frame_header = False

    # The service speaks no subprotocol (the handlers keep Tornado's
    # select_subprotocol, which picks none): a constant, so that Tornado's handshake
    # does not add the protocol's 30th attribute (see __init__).
    @property
    def selected_subprotocol(self) -> str | None:
        return None

    @selected_subprotocol.setter
    def selected_subprotocol(self, value: str | None) -> None:
        if value is not None:
            raise ValueError(f"subprotocol {value!r} selected; none is spoken here")

    @override
    def start_pinging(self) -> None:
        # One timer for every socket of the loop instead of a task each (Pinger).
        if self.ping_interval > 0:
            Pinger.of_running_loop().add(self)

    @override
    async def _receive_frame_loop(self) -> None:
        # Tornado awaits the frame loop from the handshake, so the request's whole
        # chain of coroutines (RequestHandler._execute, get, accept_connection, ...)
        # lasts as long as the socket: ~1.5 KiB each. The loop runs as a task of its
        # own instead, and the handshake's chain ends.
        task = asyncio.ensure_future(self._frame_loop())
        _frame_loops.add(task)
        task.add_done_callback(_frame_loops.discard)

    async def _frame_loop(self) -> None:
        try:
            await WebSocketProtocol13._receive_frame_loop(self)
        except asyncio.CancelledError:
            self._abort()  # as Tornado's accept_connection does on a cancel
            raise
        except Exception:
            # Tornado's handshake chain would have logged it with the request (its
            # RequestHandler._execute); this task is nobody's to await.
            self.handler.log_exception(*sys.exc_info())
            self._abort()

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


# The sockets' frame loops (StrictWebSocketProtocol._receive_frame_loop): the event
# loop keeps only weak references to tasks.
_frame_loops: set[asyncio.Task[None]] = set()


class Pinger:
    """The keep-alive of every WebSocket of one event loop, as Tornado's
    ``WebSocketProtocol13.periodic_ping`` does it for each (a ping every
    ``ping_interval`` seconds; the socket closed with "ping timed out" when no pong
    came within ``ping_timeout``), from one timer instead of a task, a coroutine and
    a sleeping future per socket (~1.2 KiB each).

    The schedule is a heap of (due time, sequence, weak reference to the protocol,
    whether the step checks for the pong, when the ping went); due times are rounded
    up to ``ping_interval / 20`` (at most 1 s), so the timer wakes at most once per
    such step, however many sockets are due. A closed socket's entry is dropped
    when it comes due."""

    _current: Pinger | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, weakref.ref[WebSocketProtocol13], bool, float]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf

    @classmethod
    def of_running_loop(cls) -> Pinger:
        """The running event loop's pinger (made on first use)."""
        loop = asyncio.get_running_loop()
        current = cls._current
        if current is None or current.loop is not loop:
            current = cls._current = cls(loop)
        return current

    def add(self, protocol: WebSocketProtocol13) -> None:
        """Ping ``protocol`` every ``protocol.ping_interval`` seconds from now on."""
        self._schedule(protocol.ping_interval, weakref.ref(protocol), False, 0.0)

    def __len__(self) -> int:
        return len(self._heap)

    def _schedule(
        self, delay: float, ref: weakref.ref[WebSocketProtocol13], checking: bool, pinged_at: float
    ) -> None:
        protocol = ref()
        if protocol is None:
            return
        grain = min(1.0, protocol.ping_interval / 20)
        due = math.ceil((self.loop.time() + delay) / grain) * grain
        heapq.heappush(self._heap, (due, next(self._sequence), ref, checking, pinged_at))
        self._arm()

    def _arm(self) -> None:
        """Have the timer fire when the first entry is due."""
        if not self._heap or self._heap[0][0] >= self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = self._heap[0][0]
        self._timer = self.loop.call_at(self._timer_due, self._run)

    def _run(self) -> None:
        # The timer stays marked as set while the due entries are handled, so their
        # new entries do not each set it again; it is set once, at the end (also
        # after an error: one socket's fault must not end every socket's pings).
        self._timer, self._timer_due = None, -math.inf
        now = self.loop.time()
        heap = self._heap
        try:
            while heap and heap[0][0] <= now:
                _due, _seq, ref, checking, pinged_at = heapq.heappop(heap)
                protocol = ref()
                if protocol is None or protocol.stream is None or protocol.is_closing():
                    continue
                try:
                    self._step(protocol, ref, checking, pinged_at, now)
                except StreamClosedError:
                    protocol._abort()
                except Exception:
                    logger.exception("keep-alive of a WebSocket failed; dropping it")
                    protocol._abort()
        finally:
            self._timer_due = math.inf
            self._arm()

    def _step(
        self, protocol: WebSocketProtocol13, ref: weakref.ref[WebSocketProtocol13],
        checking: bool, pinged_at: float, now: float,
    ) -> None:
        """One socket's turn: check for the pong of its last ping, or ping it."""
        if checking:
            if not protocol._received_pong:
                protocol.close(reason="ping timed out")
                return
            self._schedule(pinged_at + protocol.ping_interval - now, ref, False, 0.0)
            return
        protocol._received_pong = False
        protocol.write_ping(b"")
        timeout = protocol.ping_timeout
        if timeout > 0:
            self._schedule(timeout, ref, True, now)
        else:
            self._schedule(protocol.ping_interval, ref, False, 0.0)


class ShortDeque(list[Any]):
    """The part of ``collections.deque``'s interface Tornado's IOStream uses (append,
    popleft, clear, indexing, iteration), on a list: for its write queues, which on a
    socket that follows one order hold a few entries at most (its statuses and the
    close). An empty deque takes 624 bytes (one 64-slot block), an empty list 56.
    ``popleft`` is O(n): a socket that may queue many messages (an account feed)
    gets its deques back (``restore_write_queues``)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


# What a socket's request and response headers become once the handshake is done
# (never written: a detached handler's header methods raise).
_NO_HEADERS = HTTPHeaders()


def shed_handshake_state(handler: WebSocketHandler) -> None:
    """Drop what a WebSocket handler holds only for its handshake, once the 101 is
    answered and the stream detached (``open`` runs then): the answer's headers, the
    template namespace, the request's headers (emptied in place, as other objects of
    the handshake may refer to them) and its HTTP/1.1 connection objects. The request
    keeps its method, path and address (the access log, the account feed's client
    address)."""
    request = handler.request
    request_headers = request.headers
    for name in list(request_headers):  # emptied in place: other objects may refer to it
        del request_headers[name]
    handler._headers = _NO_HEADERS
    handler.__dict__.pop("ui", None)
    # The HTTP/1.1 connection gave its stream away (detach), and the server's
    # connection object is only for routing a request: neither serves the socket,
    # and the latter holds the finished task of its request loop (~1.5 KiB together).
    request.connection = None
    request.server_connection = None
    _set_write_queues(handler, ShortDeque)
    # A handler has more attributes than Python shares keys for, so its dict is its
    # own, grown by doubling while the handshake added to it: a copy is half the size.
    handler.__dict__ = dict(handler.__dict__)


def restore_write_queues(handler: WebSocketHandler) -> None:
    """Give the socket's IOStream its deques back (see ShortDeque): for a socket
    that may queue many messages."""
    _set_write_queues(handler, collections.deque)


def _set_write_queues(handler: WebSocketHandler, kind: Callable[[Any], Any]) -> None:
    # Tornado internals (tornado==6.6.1): the IOStream's two write queues.
    stream = handler.ws_connection.stream if handler.ws_connection is not None else None
    if stream is not None:
        stream._write_futures = kind(stream._write_futures)
        buffer = stream._write_buffer
        buffer._buffers = kind(buffer._buffers)


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
