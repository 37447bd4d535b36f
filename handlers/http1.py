"""The HTTP/1.1 server connection: Tornado's, with what it gets wrong at the wire fixed.

Every override of Tornado's HTTP/1.1 internals is in this file (they are private
APIs; tornado is pinned, 6.6.1, and tests/test_client_seat.py and
tests/test_client_seat_faults.py check each behaviour); handlers/ws_protocol.py holds
the same for the WebSocket:

* **Malformed requests get a JSON answer.** Tornado answers a request it cannot
  parse (request line, header fields, framing, a body over the size limit) with a
  bare ``HTTP/1.1 400 Bad Request`` and no body. Here: a JSON body like every other
  error (``bad_request``, or ``body_too_large`` with a 413), ``Connection: close``.
* **Chunk extensions are ignored** (RFC 9112 section 7.1.1: "A recipient MUST
  ignore unrecognized chunk extensions"), and so is a trailer section (7.1.2). Tornado
  refuses both. The grammar is still enforced, strictly (lenient chunk parsing is a
  request-smuggling vector), with a bound on the bytes they may take.
* **An early answer reaches the client.** When the service answers before it has
  read the whole body (413, 415, 403...), Tornado closes the socket as soon as the
  answer is written; the client, still sending, then gets a TCP reset, which can
  destroy the answer before it is read. Here the connection is closed in stages
  (a "lingering close", as Apache and nginx do): the answer goes out with a FIN, the
  rest of the body is read and dropped for up to LINGER_SECS and LINGER_MAX_BYTES,
  then the socket is closed. Such an answer says ``Connection: close``; an answer to a
  request with no body keeps the connection, as any other.
* **Bounds are answered, not hung up on.** A header section over HEADER_MAX_BYTES is a
  JSON 431, and a chunk line over CHUNK_METADATA_MAX_BYTES a JSON 400 (Tornado closes
  the connection without a word at its own read limits, which are set higher here).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import httputil, iostream
from tornado.concurrent import future_set_result_unless_cancelled
from tornado.http1connection import (
    _CHUNK_YIELD_COST,
    _YIELD_THRESHOLD,
    HTTP1Connection,
    HTTP1ServerConnection,
    _is_done,
    _QuietException,
    is_transfer_encoding_chunked,
    parse_hex_int,
)
from tornado.httpserver import HTTPServer, _HTTPRequestContext

from engine.core import strict_json
from engine.core.accounts import redact
from handlers.base import ErrorCode, override

logger = logging.getLogger(__name__)

# A lingering close reads (and drops) what the client still sends for this long at
# most, and at most this much: long enough for a client that sends its whole body
# before reading (Python's urllib, for one) to finish over a slow link, short enough
# that a client that never stops cannot hold the connection.
LINGER_SECS = 2.0
LINGER_MAX_BYTES = 8 * 1024 * 1024
# Chunk extensions and trailer fields carry nothing we use; they may take this many
# bytes per message in all (Node's llhttp and Bun allow 16 KiB too), and so may one
# line (a chunk-size line, or a trailer field).
CHUNK_METADATA_MAX_BYTES = 16 * 1024
# Chunks per message: each costs ~10 us of the event loop, so a body of one-byte
# chunks must not be allowed to take seconds (a 1 MiB body in 64-byte chunks is fine).
MAX_CHUNKS = 16 * 1024
# A request's header section (Tornado's default bound, which it enforces by closing
# the connection: the server's own max_header_size is set above it so that we can
# answer 431 instead, up to READ_LIMIT_BYTES).
HEADER_MAX_BYTES = 64 * 1024
# What Tornado may buffer while looking for the end of a header section or a chunk
# line; past this it closes the connection without an answer.
READ_LIMIT_BYTES = 1024 * 1024

# RFC 9112 section 7.1: chunk-size [ chunk-ext ], chunk-ext = *( BWS ";" BWS
# chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ), a name a token, a value a token or
# a quoted-string (RFC 9110 section 5.6.2 and 5.6.4).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_SIZE_LINE = re.compile(
    rb"0*([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|"
    + _QUOTED + rb"))?)*)"
)
# A trailer field line: field-name ":" OWS field-value OWS (RFC 9110 section 5).
_FIELD_LINE = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*")

_REASONS = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large"}
# Tornado's messages for a body over the server's max_body_size (a 413, not a 400).
_BODY_TOO_LARGE = frozenset({"Content-Length too long", "chunked body too large"})


class _TooLarge(httputil.HTTPInputError):
    """Input past one of our bounds: answered with ``status`` and ``error``."""

    def __init__(self, message: str, status: int, error: ErrorCode) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class _Refused(Exception):
    """The request was answered at the wire (or its answer was already out): close
    the connection in stages."""


Read = Callable[[Awaitable[bytes]], Awaitable[bytes]]


class _CheckedDelegate(httputil.HTTPMessageDelegate):
    """The application's delegate, with a request that Tornado's HTTPServerRequest
    refuses as it reads the headers (no Host, two Hosts, a bad Host) answered as
    JSON. Nothing may be raised from here (Tornado would log it as an uncaught
    exception): the refusal is noted, and the connection acts on it next."""

    def __init__(self, connection: StrictHTTP1Connection, inner: httputil.HTTPMessageDelegate) -> None:
        self.connection = connection
        self.inner = inner
        self.refused = False

    @override
    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        try:
            result = self.inner.headers_received(start_line, headers)
        except httputil.HTTPInputError as exc:
            self._refuse(exc)
            return None
        return None if result is None else self._checked(result)

    async def _checked(self, result: Awaitable[None]) -> None:
        try:
            await result
        except httputil.HTTPInputError as exc:
            self._refuse(exc)

    def _refuse(self, exc: httputil.HTTPInputError) -> None:
        self.refused = True
        self.connection.refused = self.connection._refusal(exc)

    @override
    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self.refused else self.inner.data_received(chunk)

    @override
    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    @override
    def on_connection_close(self) -> None:
        if not self.refused:  # the inner delegate never got a request to close
            self.inner.on_connection_close()


def chunk_size(line: bytes) -> tuple[int, int]:
    """The size of a chunk from its chunk-size line (CRLF removed), and how many
    bytes of the line are not its (at most 16) significant hex digits: leading zeros
    and extensions. Raises HTTPInputError for a malformed line."""
    match = _CHUNK_SIZE_LINE.fullmatch(line)
    if match is None:
        raise httputil.HTTPInputError("invalid chunk size line")
    return parse_hex_int(match.group(1).decode("ascii")), len(line) - len(match.group(1))


class StrictHTTP1Connection(HTTP1Connection):
    """Tornado's server-side HTTP/1.x connection, with the fixes in the module's
    docstring."""

    _lingering = False
    _linger_timer: object | None = None
    # Set when the application's delegate could not take the request's headers.
    refused: _Refused | None = None

    @override
    async def _read_message(self, delegate: httputil.HTTPMessageDelegate) -> bool:
        try:
            keep_open = await self._read_message_inner(_CheckedDelegate(self, delegate))
        except _Refused:
            await self._drain_and_close()
            return False
        except _QuietException:  # as Tornado's own _read_message
            self.close()
            return False
        if self._lingering:
            # Answered early; the rest of the body has now been read and dropped.
            self.close()
            return False
        return keep_open

    @override
    def _parse_headers(self, data: bytes) -> tuple[str, httputil.HTTPHeaders]:
        try:
            if len(data) > HEADER_MAX_BYTES:
                raise _TooLarge(f"header section over {HEADER_MAX_BYTES} bytes", 431,
                                ErrorCode.HEADERS_TOO_LARGE)
            start_line, headers = super()._parse_headers(data)
            # What _read_message_inner checks next, checked here so that a malformed
            # request gets our answer, not a bare 400.
            request_line = httputil.parse_request_start_line(start_line)
            chunked = is_transfer_encoding_chunked(headers)
            if chunked and request_line.version == "HTTP/1.0":
                # RFC 9112 section 6.1: its framing is faulty.
                raise httputil.HTTPInputError("Transfer-Encoding in an HTTP/1.0 request")
        except httputil.HTTPInputError as exc:
            raise self._refusal(exc) from exc
        if not chunked and headers.get("Content-Length", "0") == "0":
            # No body (RFC 9112 section 6.3): an answer before "reading" it is not an
            # early answer, and keeps the connection.
            self._read_finished = True
        return start_line, headers

    @override
    def write_headers(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        if not self.is_client and not self._read_finished:
            # An answer before the body is read: the connection closes after it (in
            # stages, see _finish_request), and the answer says so.
            self._disconnect_on_finish = True
        return super().write_headers(start_line, headers, chunk)

    @override
    def _read_body(
        self, code: int, headers: httputil.HTTPHeaders, delegate: httputil.HTTPMessageDelegate
    ) -> Awaitable[None] | None:
        if self.refused is not None:  # called next after headers_received, always
            raise self.refused
        try:
            body = super()._read_body(code, headers, delegate)
        except httputil.HTTPInputError as exc:
            raise self._refusal(exc) from exc
        # Only a chunked body can turn out malformed as it is read (a body of a known
        # length just ends); the others go as they are, with no coroutine around them.
        if body is None or "Transfer-Encoding" not in headers:
            return body
        return self._guarded(body)

    async def _guarded(self, body: Awaitable[None]) -> None:
        try:
            await body
        except httputil.HTTPInputError as exc:
            raise self._refusal(exc) from exc

    def _refusal(self, exc: httputil.HTTPInputError) -> _Refused:
        """Answer a malformed request with a JSON error, unless an answer is already
        out; the _Refused to raise."""
        peer = getattr(self.context, "remote_ip", "?")
        if self.is_client:
            raise exc
        if self._response_start_line is not None:
            logger.info("request from %s: %s (after the answer)", peer, redact(str(exc)))
            return _Refused()
        if isinstance(exc, _TooLarge):
            status, error = exc.status, exc.error
        elif str(exc) in _BODY_TOO_LARGE:
            status, error = 413, ErrorCode.BODY_TOO_LARGE
        else:
            status, error = 400, ErrorCode.BAD_REQUEST
        # Tornado's message may quote a header line: an API key must not reach the log.
        reason = redact(str(exc))
        logger.info("malformed request from %s: %s -> %d", peer, reason, status)
        body = strict_json.dumps({"error": error, "message": f"malformed HTTP request: {reason}"})
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        self._response_start_line = httputil.ResponseStartLine("HTTP/1.1", status, _REASONS[status])
        self._write_finished = True
        self._pending_write = self.stream.write(head.encode("latin-1") + body)
        return _Refused()

    async def _drain_and_close(self) -> None:
        """The lingering close: answer out with a FIN, read and drop what still comes
        (bounded), then close. Nothing else reads the stream by now."""
        stream = self.stream
        if stream is None:
            return
        try:
            if self._pending_write is not None:
                await self._pending_write
            self._shutdown_write()
            async with asyncio.timeout(LINGER_SECS):
                dropped = 0
                while dropped < LINGER_MAX_BYTES:
                    dropped += len(await stream.read_bytes(64 * 1024, partial=True))
        except (iostream.StreamClosedError, TimeoutError, OSError):
            pass
        finally:
            self.close()

    def _shutdown_write(self) -> None:
        sock = self.stream.socket if self.stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)  # the FIN follows the answer's bytes
            except OSError:
                pass  # the peer has gone already

    @override
    def _finish_request(self, future: asyncio.Future[None] | None) -> None:
        if (
            not self.is_client
            and self._disconnect_on_finish
            and not self._read_finished
            and self.stream is not None
            and not self.stream.closed()
        ):
            # Answered before the body was read. Tornado would close now, and the
            # client, still sending, would get a reset instead of the answer. Let
            # _read_message_inner read and drop the rest (bounded by the server's
            # max_body_size, and in time here), then _read_message closes.
            self._clear_callbacks()
            self._lingering = True
            self._shutdown_write()
            self._linger_timer = self.stream.io_loop.call_later(LINGER_SECS, self.close)
            future_set_result_unless_cancelled(self._finish_future, None)
            return
        super()._finish_request(future)

    @override
    def close(self) -> None:
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and self.stream is not None:
            self.stream.io_loop.remove_timeout(timer)
        super().close()

    # Tornado 6.6.1's _read_chunked_body, reading the chunk-size line with chunk_size()
    # (extensions allowed, bounded) and a trailer section after the last chunk.
    @override
    async def _read_chunked_body(self, delegate: httputil.HTTPMessageDelegate) -> None:
        total_size = 0
        metadata = 0  # bytes of chunk extensions and trailer fields so far
        chunks = 0
        pending = bytearray()
        work = 0

        def read(future: Awaitable[bytes]) -> Awaitable[bytes]:
            if pending and not _is_done(future):
                return flush_and_read(future)
            return future

        async def flush_and_read(future: Awaitable[bytes]) -> bytes:
            data = bytes(pending)
            pending.clear()
            await self._deliver_body(delegate, data)
            return await future

        while True:
            work += _CHUNK_YIELD_COST
            if work >= _YIELD_THRESHOLD:
                work = 0
                await asyncio.sleep(0)
            line = await read(self.stream.read_until(b"\r\n", max_bytes=READ_LIMIT_BYTES))
            chunk_len, extensions = chunk_size(line[:-2])
            metadata += extensions
            chunks += 1
            if metadata > CHUNK_METADATA_MAX_BYTES:
                raise httputil.HTTPInputError("chunk extensions too large")
            if chunks > MAX_CHUNKS:
                raise httputil.HTTPInputError(f"more than {MAX_CHUNKS} chunks")
            if chunk_len == 0:
                await self._read_trailer(read, metadata)
                if pending:
                    await self._deliver_body(delegate, bytes(pending))
                return
            total_size += chunk_len
            if total_size > self._max_body_size:
                raise httputil.HTTPInputError("chunked body too large")
            bytes_to_read = chunk_len
            while bytes_to_read:
                chunk = await read(
                    self.stream.read_bytes(min(bytes_to_read, self.params.chunk_size), partial=True)
                )
                bytes_to_read -= len(chunk)
                if not pending and len(chunk) == self.params.chunk_size:
                    await self._deliver_body(delegate, chunk)
                else:
                    pending += chunk
                    if len(pending) >= self.params.chunk_size:
                        data = bytes(pending[: self.params.chunk_size])
                        del pending[: self.params.chunk_size]
                        await self._deliver_body(delegate, data)
                work += len(chunk)
                if work >= _YIELD_THRESHOLD:
                    work = 0
                    await asyncio.sleep(0)
            crlf = await read(self.stream.read_bytes(2))
            if crlf != b"\r\n":
                raise httputil.HTTPInputError("improperly terminated chunk")

    async def _read_trailer(self, read: Read, metadata: int) -> None:
        """Read and drop the trailer section after the last chunk, up to its CRLF."""
        while True:
            line = await read(self.stream.read_until(b"\r\n", max_bytes=READ_LIMIT_BYTES))
            if line == b"\r\n":
                return
            metadata += len(line)
            if metadata > CHUNK_METADATA_MAX_BYTES:
                raise httputil.HTTPInputError("trailer section too large")
            if not _FIELD_LINE.fullmatch(line[:-2]):
                raise httputil.HTTPInputError("improperly terminated chunked request")


class StrictHTTP1ServerConnection(HTTP1ServerConnection):
    """Serves each request of a connection with a StrictHTTP1Connection."""

    # Tornado 6.6.1's _server_request_loop, with the connection class replaced.
    @override
    async def _server_request_loop(self, delegate: httputil.HTTPServerConnectionDelegate) -> None:
        try:
            while True:
                conn = StrictHTTP1Connection(self.stream, False, self.params, self.context)
                request_delegate = delegate.start_request(self, conn)
                try:
                    ret = await conn.read_response(request_delegate)
                except (
                    iostream.StreamClosedError,
                    iostream.UnsatisfiableReadError,
                    asyncio.CancelledError,
                ):
                    return
                except Exception:
                    logger.exception("uncaught exception serving a connection")
                    conn.close()
                    return
                if not ret:
                    return
                await asyncio.sleep(0)
        finally:
            delegate.on_close(self)


class JSONHTTPServer(HTTPServer):
    """Tornado's HTTPServer, serving connections with StrictHTTP1ServerConnection.
    Takes HTTPServer's arguments; ``max_header_size`` defaults to READ_LIMIT_BYTES,
    so that a header section past HEADER_MAX_BYTES is answered (431), not dropped."""

    @override
    def initialize(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_header_size", READ_LIMIT_BYTES)
        super().initialize(*args, **kwargs)

    @override
    def handle_stream(self, stream: iostream.IOStream, address: tuple[str, int]) -> None:
        context = _HTTPRequestContext(stream, address, self.protocol, self.trusted_downstream)
        conn = StrictHTTP1ServerConnection(stream, self.conn_params, context)
        self._connections.add(conn)
        conn.start_serving(self)
