"""Live status fan-out for one web process.

One poller task reads the ``orders:events`` stream and hands each message to the
subscriptions registered for its order. A subscription guarantees its socket sees
every status of its order exactly once and in order, however late it joined:

1. it registers first, so from then on the poller offers it every live message;
2. it reads the order's own event stream (history) and sends what it has not sent;
3. live messages that arrived meanwhile were buffered; those with a higher ``seq``
   follow.

Each message carries ``seq`` (1, 2, 3... per order, assigned in the same atomic step
that wrote it), so duplicates are dropped by comparing with the last seq sent, and a
gap (the poller fell behind an approximate trim, or Redis restarted) is repaired by
reading the history again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from engine.core import keys
from engine.core.config import Config
from engine.core.connections import REDIS_DOWN_ERRORS, raise_if_cancelled
from engine.core.pipelined import field_values
from engine.core.status import TERMINAL
from engine.core.store import OrderStore, StreamEntries

logger = logging.getLogger(__name__)

# How many stream entries one XREAD may return: large enough that a burst is drained
# in few round trips, small enough that one batch does not hold the IOLoop for long.
POLL_BATCH = 1000
# After a read that found events, the poller waits this long before the next one, so
# that under load one XREAD brings many events instead of one each (at 1,000 orders/s
# it was 21% of a web process's CPU, one round trip per event). An idle stream still
# wakes the blocked XREAD at once: only events that follow within this window wait.
POLL_COALESCE_SECS = 0.002
# While no socket of this process watches an order, nobody needs the events: the
# poller then only notes the stream's newest entry this often, instead of reading
# every event (at 1,000 orders/s that was ~100 us of CPU per order). The first
# subscription wakes it at once, and it reads on from the entry it noted last: that
# covers every event written after the subscriber registered (step 1 above); the
# earlier ones are in the subscriber's history read (step 2).
IDLE_POLL_SECS = 0.25
# Delay before the poller tries Redis again after a connection error.
RECONNECT_DELAY_SECS = 0.5
# What the poller waits out and retries: Redis unreachable, and any error reply (a
# BUSY script, a MISCONF disk...), which would otherwise end the poller's task and
# with it every live status of this web process.
POLLER_ERRORS = (*REDIS_DOWN_ERRORS, ResponseError)

# Called with (message JSON, is_terminal) for each message to send, in order.
Sink = Callable[[str, bool], None]

# How a terminal status reads in a message (engine.core.strict_json writes no spaces).
_TERMINAL_MARKERS = tuple(f'"status":"{status}"' for status in sorted(TERMINAL))


def is_terminal(data: str) -> bool:
    """Whether a status message (as written by engine.core.store) ends its order."""
    return any(marker in data for marker in _TERMINAL_MARKERS)


class Subscription:
    """One socket's view of one order: dedups, orders and gap-fills its messages."""

    def __init__(self, hub: StatusHub, order_id: str, sink: Sink) -> None:
        self.hub = hub
        self.order_id = order_id
        self.sink = sink
        self.last_seq = 0
        self.finished = False
        self._syncing = False
        self._buffer: list[tuple[int, str]] = []
        self._repair: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        """Send every message after ``last_seq`` from the order's history, then the
        live ones that arrived meanwhile. Raises Redis errors to the caller."""
        self._syncing = True
        try:
            history = await self.hub.store.history(self.order_id, self.last_seq)
        finally:
            # On an error the buffer is kept: the next gap triggers another refill.
            self._syncing = False
        for seq, data in history:
            self._emit(seq, data)
        buffered, self._buffer = self._buffer, []
        for seq, data in sorted(buffered):
            self.offer(seq, data)

    def offer(self, seq: int, data: str) -> None:
        """A live message from the poller (or the buffer)."""
        if seq <= self.last_seq or self.finished:
            return
        if self._syncing:
            self._buffer.append((seq, data))
        elif seq == self.last_seq + 1:
            self._emit(seq, data)
        else:
            # A gap: some message never reached the poller. The history has it.
            self._buffer.append((seq, data))
            if self._repair is None or self._repair.done():
                self._repair = asyncio.ensure_future(self._refill())

    def _emit(self, seq: int, data: str) -> None:
        if seq != self.last_seq + 1 or self.finished:
            return
        self.last_seq = seq
        terminal = is_terminal(data)
        self.finished = terminal
        self.sink(data, terminal)

    async def _refill(self) -> None:
        try:
            await self.sync()
        except REDIS_DOWN_ERRORS as exc:
            raise_if_cancelled()
            logger.warning("could not refill order %s from its history: %s", self.order_id, exc)

    def close(self) -> None:
        self.finished = True
        if self._repair is not None:
            self._repair.cancel()
        self.hub.unsubscribe(self)


class Feed:
    """One socket following every order of one API key (``owner``): each of their
    status messages as the poller reads it, live from when it subscribed, in the
    order they were written (no history: GET /api/orders gives what came before)."""

    def __init__(
        self, hub: StatusHub, owner: str, sink: Callable[[str], None], revoked: Callable[[], None]
    ) -> None:
        self.hub = hub
        self.owner = owner
        self.sink = sink
        # Called once the key is found revoked (Services checks every second).
        self.revoked = revoked

    def close(self) -> None:
        self.hub.unfollow(self)


class StatusHub:
    """The subscriber registry and the poller that feeds it (one per web process)."""

    def __init__(self, redis: Redis, store: OrderStore, config: Config) -> None:
        # ``redis`` is a client whose socket timeout exceeds the poll block time.
        self.redis = redis
        self.store = store
        self.config = config
        self._by_order: dict[str, set[Subscription]] = {}
        self._by_owner: dict[str, set[Feed]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._joined = 0  # subscriptions made so far
        # The poller's own connection for XREAD (see _read).
        self._conn: AbstractConnection | None = None
        self.last_id = ""
        self.delivered = 0
        self.reads = 0  # XREADs made, and the idle checks of the newest entry (for tests)
        self.idle_checks = 0

    @property
    def subscriber_count(self) -> int:
        return sum(len(subs) for subs in self._by_order.values())

    @property
    def _watched(self) -> bool:
        """Whether any socket of this process waits for events."""
        return bool(self._by_order or self._by_owner)

    @property
    def followed_owners(self) -> list[str]:
        """The API keys (ids) that some Feed of this process follows."""
        return list(self._by_owner)

    def follow(self, owner: str, sink: Callable[[str], None], revoked: Callable[[], None]) -> Feed:
        """A Feed of every status message of ``owner``'s orders, from now on;
        ``revoked`` is called if the key is revoked meanwhile."""
        feed = Feed(self, owner, sink, revoked)
        self._register(self._by_owner, owner, feed)
        return feed

    def unfollow(self, feed: Feed) -> None:
        """Stop delivering to ``feed`` (its socket closed); idempotent."""
        _unregister(self._by_owner, feed.owner, feed)

    def feeds_of(self, owner: str) -> list[Feed]:
        """The Feeds following ``owner`` (e.g. to close them once its key is revoked)."""
        return list(self._by_owner.get(owner, ()))

    def subscribe(self, order_id: str, sink: Sink) -> Subscription:
        """Register a subscription; the caller then awaits ``sync()`` on it."""
        sub = Subscription(self, order_id, sink)
        self._register(self._by_order, order_id, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        _unregister(self._by_order, sub.order_id, sub)

    def _register(self, index: dict[str, set[Any]], key: str, receiver: Any) -> None:
        """Add a Subscription or a Feed to its index. Counted in ``_joined`` (see
        _note_newest), and an idle poller is woken to read live from now on."""
        self._joined += 1
        if not self._watched:
            self._wake.set()
        index.setdefault(key, set()).add(receiver)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # The flag as well as the cancel: redis-py can turn a cancellation that lands
        # mid-read into a ConnectionError, which the loop would take for an outage.
        self._stopping = True
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if self._conn is not None:
            await self._conn.disconnect()

    async def _run(self) -> None:
        warned = False
        while not self.last_id and not self._stopping:
            try:
                await self._note_newest()
            except POLLER_ERRORS as exc:
                raise_if_cancelled()
                if not warned:  # once per outage, not twice a second
                    logger.warning("status poller cannot reach Redis (%s); retrying", exc)
                    warned = True
                await asyncio.sleep(RECONNECT_DELAY_SECS)
        logger.info("status poller started after entry %s", self.last_id)
        failing = False
        while not self._stopping:
            if not self._watched and not failing:
                await self._idle()
            try:
                if not self._watched:
                    # Nobody to deliver to: only keep the place.
                    await self._note_newest()
                    self.idle_checks += 1
                    read = 0
                else:
                    if failing:
                        await self._check_position()
                    read = await self._read()
            except POLLER_ERRORS as exc:
                raise_if_cancelled()
                if not failing:
                    logger.warning("status poller lost Redis (%s); retrying", exc)
                failing = True
                await asyncio.sleep(RECONNECT_DELAY_SECS)
                continue
            if failing:
                logger.info("status poller reconnected to Redis")
                failing = False
            if 0 < read < POLL_BATCH:
                await asyncio.sleep(POLL_COALESCE_SECS)

    async def _read(self) -> int:
        """One XREAD (blocking while the stream has nothing new); dispatches what it
        brings and returns how many entries that was.

        It runs on a connection of the poller's own, command and reply at the
        connection level, bounded by one timeout: redis-py's command path (its pool,
        retry wrapper and a task per send to time the write) took half of each
        read's CPU, ~55 us of ~110, and the poller reads up to 500 times a second.
        On any error the connection is dropped (a reply read in part would garble
        the next one) and opened again on the next read; the caller handles the
        error as for any other command.
        """
        conn = self._conn
        if conn is None:
            pool = self.redis.connection_pool
            # Same server, credentials, TLS and decoding as the client; the timeout
            # below replaces the socket timeout.
            conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            self._conn = conn
        block_ms = self.config.poll_block_ms
        command = conn.pack_command(
            "XREAD", "COUNT", POLL_BATCH, "BLOCK", block_ms, "STREAMS", keys.EVENTS_STREAM,
            self.last_id,
        )
        try:
            async with asyncio.timeout(self.config.redis_timeout_secs + block_ms / 1000):
                await conn.send_packed_command(command, check_health=False)
                reply = await conn.read_response(timeout=math.inf)  # the block above bounds it
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self.reads += 1
        entries = stream_entries(reply)
        self._dispatch(entries)
        return len(entries)

    async def _idle(self) -> None:
        """Wait until a subscription arrives or IDLE_POLL_SECS pass."""
        self._wake.clear()
        if self._watched:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECS)
        except TimeoutError:
            pass

    async def _note_newest(self) -> None:
        """Move the poller's place to the stream's newest entry: every event a later
        subscriber needs live comes after it.

        Unless a subscription arrived while asking: Redis may have run that
        subscriber's history read first, and an event written between the two reads
        would be in neither. The place then stays where it was (or, with none yet,
        goes to the stream's start; seq dedup drops what is read twice).
        """
        joined = self._joined
        newest = await self._newest_id()
        if self._joined == joined:
            self.last_id = newest
        elif not self.last_id:
            self.last_id = "0-0"

    async def _newest_id(self) -> str:
        """The id of the newest entry of the events stream ("0-0" if it is empty)."""
        newest = cast(StreamEntries, await self.redis.xrevrange(keys.EVENTS_STREAM, count=1))
        return newest[0][0] if newest else "0-0"

    async def _check_position(self) -> None:
        """After an outage: if the stream restarted behind us (Redis came back without
        its data), read it from the start again; seq dedup drops any repeat."""
        newest_id = await self._newest_id()
        if _stream_id(newest_id) < _stream_id(self.last_id):
            logger.warning("orders:events is behind the poller (%s < %s); rereading it",
                           newest_id, self.last_id)
            self.last_id = "0-0"

    def _dispatch(self, entries: StreamEntries) -> None:
        by_order, by_owner = self._by_order, self._by_owner
        for entry_id, fields in entries:
            self.last_id = entry_id
            subs = by_order.get(fields["id"])
            if subs:
                seq = int(fields["seq"])
                for sub in list(subs):
                    sub.offer(seq, fields["data"])
                    self.delivered += 1
            if by_owner:
                feeds = by_owner.get(fields.get("owner", ""))
                if feeds:
                    for feed in list(feeds):
                        feed.sink(fields["data"])
                        self.delivered += 1


def _unregister(index: dict[str, set[Any]], key: str, receiver: Any) -> None:
    """Remove a Subscription or a Feed from its index (idempotent)."""
    receivers = index.get(key)
    if receivers is not None:
        receivers.discard(receiver)
        if not receivers:
            del index[key]


def stream_entries(reply: Any) -> StreamEntries:
    """The entries of a raw XREAD reply for one stream: a RESP3 map {stream: entries}
    (redis-py 8's default protocol), a RESP2 list [[stream, entries]], or nil when the
    block ended with nothing new. Each entry is [id, [field, value, ...]]."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (pair[1] for pair in reply)
    out: StreamEntries = []
    for entries in streams:
        out.extend((entry_id, field_values(fields)) for entry_id, fields in entries)
    return out


def _stream_id(entry_id: str) -> tuple[int, int]:
    millis, _, counter = entry_id.partition("-")
    return int(millis), int(counter or 0)
