"""One pipelined Redis connection per process for an order's hot path: the web's
creates, cancels and reads of one order, the worker's transitions and per-order steps.

redis-py's asyncio client takes a connection from its pool for every command (a
condition, a lock, a timer, observability hooks and an event dispatch around it),
then sends the command and reads the reply under a second timer. In the web process
under load that path cost about 125 µs of CPU per POST, a quarter of the POST's
whole cost (interleaved A/B, docs/benchmarks.md). Redis answers the commands of one
connection in the order they were sent, so a connection can carry many callers'
commands at once: each caller queues its command and waits on a future, the
commands queued in one pass of the event loop go out in one write, and the replies
resolve the futures in order. No pool, no lock, no timer, and no system call per
command.

The commands of an order's hot path go this way (``HotPath``): the order store's
scripts (a POST's one command, the worker's transitions), the reads of one order, and
the worker's per-order steps (its ownership checks, its venue's ledger). Everything
else (stream reads that block, administration) uses redis-py. ``redis://`` and
``unix://`` URLs are supported, with ACL user, password and database; for
``rediss://`` (TLS) the store keeps using redis-py (``for_url`` returns None).

Faults, each tested against a real Redis (tests/test_pipelined.py):

- The connection is refused, reset or closed: every caller waiting on it gets a
  redis-py ``ConnectionError`` (a 503 upstream); the next command reconnects.
- Redis stops answering (frozen, or a half-open socket): callers are bounded by
  their own timeout (the handler's ``redis_guard``); a watchdog drops the connection
  once no reply has come for ``stall_secs`` while commands waited, so later commands
  reconnect instead of queueing behind a dead socket.
- A caller is cancelled or times out: its reply is still read, and dropped.
- Error replies raise what redis-py raises for them (``NoScriptError``,
  ``BusyLoadingError``...), and ``evalsha`` loads its script on NOSCRIPT.
- A caller that passes an ``Unanswered`` learns, when its call fails, whether Redis
  may have executed the command anyway: a command written to a connection that was
  lost or stalled before its reply may or may not have run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

logger = logging.getLogger(__name__)

Arg = str | bytes | int | float


class Script:
    """A Lua script, sent by its SHA1 (EVALSHA) and loaded when Redis lacks it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class Unanswered:
    """Sends of one logical command (``evalsha`` may send it twice) still waiting for
    their reply. When the call fails, ``count > 0`` means Redis may have executed the
    command: its outcome is unknown, not a failure. Not thread-safe; one per call."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class _Connection(asyncio.Protocol):
    """One socket: commands queued as they come and written once per pass of the
    event loop, replies matched in order."""

    def __init__(self, owner: PipelinedRedis) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(encoding="utf-8")  # str replies, like decode_responses
        # A future per command sent (written, or queued in the outbox), in order, and
        # the caller's Unanswered if any.
        self._waiting: deque[tuple[asyncio.Future[Any], Unanswered | None]] = deque()
        self._replies = 0
        # Commands sent since the last write: one write (one system call) per pass of
        # the event loop, however many callers sent one in it.
        self._outbox: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, args: Sequence[Arg], unanswered: Unanswered | None = None) -> asyncio.Future[Any]:
        """Queue one command for this pass's write; the future resolves with its
        reply. ``unanswered`` counts it from now until its reply arrives (or until
        the connection is lost before it was written)."""
        if self.closing:
            raise RedisConnectionError("the Redis connection is closed")
        # Packed first: an argument it refuses must not leave a future in the queue
        # with no command sent for it, or every later reply would go to the wrong caller.
        packed = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((future, unanswered))
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(packed)
        if unanswered is not None:
            unanswered.count += 1
        if self._watchdog is None:
            self._arm_watchdog()
        return future

    @property
    def closing(self) -> bool:
        """Lost, or about to be (aborted: connection_lost() comes a pass later)."""
        return self.lost or self.transport is None or self.transport.is_closing()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return  # connection_lost() counts what the outbox holds as never written
        outbox, self._outbox = self._outbox, []
        transport.write(b"".join(outbox))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(f"not a Redis reply: {exc}")
                return
            if reply is False:
                return
            if not self._waiting:  # RESP2 sends nothing unasked: the stream is broken
                self.abort("a reply to no command")
                return
            self._replies += 1
            future, unanswered = self._waiting.popleft()
            if unanswered is not None:
                unanswered.count -= 1
            if future.done():  # its caller gave up; the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                # redis-py's own mapping: NOSCRIPT -> NoScriptError, LOADING -> ...
                future.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        why = f"the Redis connection was lost: {exc or 'closed'}"
        # The last ones were never written (still in the outbox): certainly not run.
        unsent, self._outbox = len(self._outbox), []
        while self._waiting:
            future, unanswered = self._waiting.popleft()  # written ones stay counted: fate unknown
            if unanswered is not None and len(self._waiting) < unsent:
                unanswered.count -= 1
            if not future.done():  # one exception each: a raise adds to its traceback
                future.set_exception(RedisConnectionError(why))
        self._owner._forget(self)

    def abort(self, why: str) -> None:
        if not self.lost and self.transport is not None:
            logger.warning("dropping the request-path Redis connection: %s", why)
            self.transport.abort()  # connection_lost() follows, and fails every waiter

    # A reply overdue by stall_secs means a frozen Redis or a dead socket. The
    # watchdog is armed only while a command waits, and never per command: when it
    # fires, a reply since it was armed means the connection is alive.
    def _arm_watchdog(self) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(
            self._owner.stall_secs, self._check_progress, self._replies
        )

    def _check_progress(self, replies_when_armed: int) -> None:
        self._watchdog = None
        if not self._waiting or self.lost:
            return
        if self._replies == replies_when_armed:
            self.abort(f"no reply for {self._owner.stall_secs:g} s")
        else:
            self._arm_watchdog()


class PipelinedRedis:
    """Commands from any number of callers over one connection, made on first use."""

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 1.0,
        stall_secs: float = 1.5,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.db, self.username, self.password = db, username, password
        self.connect_timeout = connect_timeout
        self.stall_secs = stall_secs
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    @classmethod
    def for_url(cls, url: str, *, connect_timeout: float, stall_secs: float) -> PipelinedRedis | None:
        """A pipelined connection to ``url``, or None if the URL needs what this module
        does not do (TLS, or an option besides user, password and database)."""
        params = parse_url(url)
        # TCP or Unix socket are told apart by "path"; TLS is not done here.
        if params.pop("connection_class", None) is SSLConnection:
            return None
        if set(params) - {"host", "port", "path", "db", "username", "password"}:
            return None
        return cls(
            host=params.get("host", "localhost"),
            port=int(params.get("port", 6379)),
            path=params.get("path"),
            db=int(params.get("db", 0)),
            username=params.get("username"),
            password=params.get("password"),
            connect_timeout=connect_timeout,
            stall_secs=stall_secs,
        )

    @property
    def address(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    async def execute(self, *args: Arg, unanswered: Unanswered | None = None) -> Any:
        """Send one command and return its reply (decoded to str)."""
        connection = self._connection
        if connection is None or connection.closing:
            connection = await self._connected()
        return await connection.send(args, unanswered)

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        unanswered: Unanswered | None = None,
    ) -> Any:
        """Run ``script`` (loading it first if Redis does not have it).

        Sent once more after a lost connection, so a script must be safe to run
        twice (a command's fate is unknown when its connection dies); after a
        NOSCRIPT it is loaded and sent again, with the same once-more rule."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.execute_idempotent(*command, unanswered=unanswered)
        except NoScriptError:
            await self.execute_idempotent("SCRIPT", "LOAD", script.text)
            return await self.execute_idempotent(*command, unanswered=unanswered)

    async def execute_idempotent(self, *args: Arg, unanswered: Unanswered | None = None) -> Any:
        """``execute`` a command that is safe to run twice (a read, or a script
        written to be): sent once more after a lost connection, as redis-py's own
        retry would."""
        try:
            return await self.execute(*args, unanswered=unanswered)
        except RedisConnectionError:
            if self._closed:
                raise
            return await self.execute(*args, unanswered=unanswered)

    async def _connected(self) -> _Connection:
        if self._closed:
            raise RedisConnectionError("the pipelined Redis client is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        # Shielded: one caller's cancellation must not abort the others' connect.
        return await asyncio.shield(self._connecting)

    def _connect_done(self, attempt: asyncio.Future[_Connection]) -> None:
        self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved: every waiter got it already

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        setup: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path:
                    _, connection = await loop.create_unix_connection(
                        lambda: _Connection(self), self.path
                    )
                else:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self), self.host, self.port
                    )
                if self.password is not None:
                    user = () if self.username is None else (self.username,)
                    setup.append(connection.send(("AUTH", *user, self.password)))
                if self.db:
                    setup.append(connection.send(("SELECT", self.db)))
                for reply in setup:
                    await reply
        except BaseException as exc:
            for reply in setup:  # e.g. SELECT's, after AUTH failed: nobody awaits it now
                if reply.done() and not reply.cancelled():
                    reply.exception()  # retrieved, so not logged as never retrieved
                reply.cancel()
            if connection is not None and connection.transport is not None:
                connection.transport.abort()
            if isinstance(exc, (OSError, TimeoutError)):
                raise RedisConnectionError(
                    f"cannot connect to Redis at {self.address}: {str(exc) or 'timed out'}"
                ) from exc
            raise
        if self._closed:
            assert connection.transport is not None
            connection.transport.abort()
            raise RedisConnectionError("the pipelined Redis client is closed")
        self._connection = connection
        return connection

    def _forget(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None

    async def aclose(self) -> None:
        """Close the connection; waiting callers get a ConnectionError."""
        self._closed = True  # a connect under way ends with a ConnectionError
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.abort()
        await asyncio.sleep(0)  # let connection_lost run


def field_values(flat: Sequence[str]) -> dict[str, str]:
    """A hash or stream entry as RESP2 replies carry it, ``[field, value, ...]``, as a
    dict (what redis-py's decoding client makes of it). Raises ValueError for an odd
    length."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class HotPath:
    """The commands of an order's hot path, over the pipelined connection ``pipe``
    when there is one, else over redis-py's ``redis`` (a client that decodes
    replies): replies come back shaped as that client shapes them.

    Reads and scripts are sent once more after a lost connection (a script must
    therefore be safe to run twice: see ``PipelinedRedis.evalsha``)."""

    def __init__(self, redis: Redis, pipe: PipelinedRedis | None) -> None:
        self.redis = redis
        self.pipe = pipe

    def script(self, text: str) -> HotScript:
        """``text`` as a script to run on this path."""
        return HotScript(self, text)

    async def hgetall(self, key: str) -> dict[str, str]:
        """HGETALL: the hash's fields and values ({} for no hash)."""
        if self.pipe is None:
            return cast(dict[str, str], await self.redis.hgetall(key))
        return field_values(await self.pipe.execute_idempotent("HGETALL", key))

    async def exists(self, key: str) -> bool:
        """EXISTS of one key."""
        if self.pipe is None:
            return bool(await self.redis.exists(key))
        return bool(await self.pipe.execute_idempotent("EXISTS", key))

    async def xrange(self, key: str) -> list[tuple[str, dict[str, str]]]:
        """XRANGE key - +: every entry, oldest first, as (id, {field: value})."""
        if self.pipe is None:
            return cast(list[tuple[str, dict[str, str]]], await self.redis.xrange(key))
        entries = await self.pipe.execute_idempotent("XRANGE", key, "-", "+")
        return [(entry_id, field_values(flat)) for entry_id, flat in entries]


class HotScript:
    """A script run on a HotPath: EVALSHA over its pipelined connection, or redis-py's
    registered script."""

    def __init__(self, path: HotPath, text: str) -> None:
        self._path = path
        self._piped = Script(text)
        self._registered = path.redis.register_script(text)

    async def __call__(
        self, *, keys: Sequence[str], args: Sequence[Arg], unanswered: Unanswered | None = None
    ) -> Any:
        """The script's reply. ``unanswered`` counts the call while Redis may have
        run it with no reply back yet (see Unanswered)."""
        pipe = self._path.pipe
        if pipe is not None:
            return await pipe.evalsha(self._piped, keys, args, unanswered)
        if unanswered is None:
            return await self._registered(keys=keys, args=args)
        # redis-py does not say whether it wrote the command (or re-sent it): counted
        # as unanswered until a reply, an error reply included, comes back; but only
        # once a connection is up (the pool connects it), so a Redis that cannot be
        # reached at all is a failure that certainly sent nothing.
        pool = self._path.redis.connection_pool
        await pool.release(await pool.get_connection())  # type: ignore[no-untyped-call]
        unanswered.count += 1
        try:
            result = await self._registered(keys=keys, args=args)
        except ResponseError:
            unanswered.count -= 1
            raise
        unanswered.count -= 1
        return result
