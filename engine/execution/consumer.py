"""The orders stream's consumer: lease, read, claim, heartbeat, dispatch, ack, dead letters.

The orders-stream entry is acknowledged (and deleted) only after its order reached a
terminal status. Until then it sits in the group's pending list: a worker's own
entries are resumed when it starts, entries of a dead worker are taken over with
XAUTOCLAIM once idle for ``claim_idle_ms``, and a live worker keeps its entries fresh
(XCLAIM JUSTID) so they are not taken from it while it waits for a slow confirmation.
An entry delivered more than ``max_deliveries`` times, or one that names no order,
goes to the dead-letter stream; its order (if any) is failed with a reason. What
happens to the order itself is the driver's business (engine.execution.driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine import keys
from engine.config import Config
from engine.connections import REDIS_DOWN_ERRORS, raise_if_cancelled
from engine.execution.driver import OrderDriver, PoisonEntry, owner_check
from engine.store import OrderStore

logger = logging.getLogger(__name__)

# XREADGROUP BLOCK: short enough that a stop request or an XAUTOCLAIM round is never
# far away, and well below the client's socket timeout (redis_timeout_secs + block).
READ_BLOCK_MS = 1000
# After a Redis connection error, wait this long before trying again.
REDIS_RETRY_SECS = 1.0
# The longest wait for the heartbeat task to end when the worker stops.
HEARTBEAT_STOP_SECS = 2.0
# XAUTOCLAIM at least this often, whatever claim_idle_ms is.
CLAIM_INTERVAL_MAX_SECS = 5.0
# Burst mode: how often to look again while other workers still hold pending entries.
BURST_POLL_SECS = 0.05
# Removes a worker's record (keys.worker) only if it is still this process's.
_RELEASE_NAME_LUA = """
local record = redis.call('GET', KEYS[1])
if record and cjson.decode(record)['token'] == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# The dead-letter stream is for an operator to read; keep it from growing forever.
DEAD_LETTER_MAXLEN = 100_000

# Refresh the idle time of the entries this consumer still owns, and only those: an
# entry another worker has claimed (this one was frozen or partitioned past
# claim_idle_ms) is not taken back. Returns the ids this consumer no longer owns.
# KEYS: orders stream; ARGV: group, consumer, entry ids...
_KEEP_OWNED_LUA = """
local lost = {}
for i = 3, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if row[1] and row[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


class LostEntry(Exception):
    """Another worker has taken over this task's entry: stop working on the order."""


def consumer_name() -> str:
    """A consumer name unique to this process: hostname-pid-random."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Consumer:
    """Consumes ``keys.ORDERS_STREAM`` as one member of ``keys.EXECUTORS_GROUP``, and
    hands each entry's order to ``driver``.

    ``run()`` works until ``stop()`` (or, with ``burst=True``, until the group has
    nothing left to do), then lets in-flight orders finish within
    ``config.shutdown_grace_secs`` and cancels the rest: their entries stay pending, so
    another worker or the next start takes them over. The Redis client is the
    caller's: ``run()`` does not close it. ``consumer`` is this worker's name in the
    group (default: WORKER_NAME, else unique to the process).
    """

    def __init__(
        self, redis: Redis, config: Config, driver: OrderDriver, *, consumer: str | None = None
    ) -> None:
        self.redis = redis
        self.config = config
        self.driver = driver
        self.consumer = consumer or config.worker_name or consumer_name()
        # Marks this process's record under keys.worker(consumer): a restarted worker
        # of the same name tells its predecessor's record from its own.
        self._token = secrets.token_hex(8)
        self.concurrency = config.worker_concurrency
        self._claim_interval_secs = min(config.claim_idle_ms / 2000, CLAIM_INTERVAL_MAX_SECS)
        self._block_ms = max(1, min(READ_BLOCK_MS, int(self._claim_interval_secs * 1000)))
        self._stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group_ready = False
        # Own pending entries are read (from this cursor) before new ones: at start,
        # and again after a connection error may have lost a delivery.
        self._read_history = True
        self._history_cursor = "0"
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0
        self._keep_owned = redis.register_script(_KEEP_OWNED_LUA)
        self._release_name_script = redis.register_script(_RELEASE_NAME_LUA)
        self._heartbeat_stop = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def store(self) -> OrderStore:
        """The driver's order store."""
        return self.driver.store

    @property
    def in_flight(self) -> int:
        """Orders being worked on right now."""
        return len(self._tasks)

    def stop(self) -> None:
        """Stop taking new work; ``run()`` then drains and returns."""
        if not self._stop.is_set():
            logger.info("worker %s: stopping", self.consumer)
            self._stop.set()

    async def run(self, *, burst: bool = False) -> None:
        """Work until stopped (or, in burst mode, until there is no work left)."""
        logger.info(
            "worker %s: consuming %s as group %s (concurrency %s%s)",
            self.consumer,
            keys.ORDERS_STREAM,
            keys.EXECUTORS_GROUP,
            self.concurrency,
            ", burst" if burst else "",
        )
        await self._take_name()
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.consumer}")
        try:
            await self._loop(burst)
            # The heartbeat goes on meanwhile: orders finishing in the grace period
            # must not look abandoned to the other workers.
            await self._drain()
        except asyncio.CancelledError:
            # Cancelled from outside (a test's crash, a second signal): no grace.
            await self._cancel_in_flight()
            raise
        finally:
            self._heartbeat_stop.set()
            heartbeat.cancel()
            await asyncio.wait({heartbeat}, timeout=HEARTBEAT_STOP_SECS)
            await self._release_name()
        logger.info("worker %s: stopped", self.consumer)

    def _record(self, in_flight: int) -> str:
        """This process's entry under keys.worker(consumer): alive, and how busy."""
        return json.dumps({"in_flight": in_flight, "pid": os.getpid(), "token": self._token})

    async def _take_name(self) -> None:
        """Wait until no other live process uses this consumer name.

        Two processes of one name would each take the other's pending entries for
        their own. A unique name (the default) is free at once. A fixed one
        (WORKER_NAME, DYNO) may still be held by the process this one replaces: it
        lets go when it stops gracefully, or its record expires CLAIM_IDLE_MS after
        it died, the same wait after which its entries could be claimed anyway.
        """
        warned = False
        while not self._stop.is_set():
            try:
                taken = await self.redis.set(
                    keys.worker(self.consumer), self._record(0), nx=True,
                    px=self.config.claim_idle_ms,
                )
                if taken:
                    return
                if not warned:
                    logger.warning(
                        "worker %s: another process of this name is alive, or stopped "
                        "less than %s ms ago; waiting until its record expires",
                        self.consumer, self.config.claim_idle_ms,
                    )
                    warned = True
                await self._sleep_unless_stopped(min(1.0, self.config.claim_idle_ms / 1000))
            except REDIS_DOWN_ERRORS as exc:
                raise_if_cancelled()
                logger.warning("worker %s: Redis unavailable (%s); retrying in %s s",
                               self.consumer, exc, REDIS_RETRY_SECS)
                await self._sleep_unless_stopped(REDIS_RETRY_SECS)

    async def _release_name(self) -> None:
        """Let a successor of the same name start at once (only our own record)."""
        try:
            await self._release_name_script(keys=[keys.worker(self.consumer)], args=[self._token])
        except (*REDIS_DOWN_ERRORS, ResponseError) as exc:
            raise_if_cancelled()
            logger.warning("worker %s: could not remove its record: %s", self.consumer, exc)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        grace = self.config.shutdown_grace_secs
        logger.info("worker %s: waiting up to %s s for %s orders in flight",
                    self.consumer, grace, len(self._tasks))
        _done, pending = await asyncio.wait(set(self._tasks.values()), timeout=grace)
        if pending:
            logger.warning(
                "worker %s: %s orders still in flight after %s s; cancelling them "
                "(they stay pending for another worker)",
                self.consumer, len(pending), grace,
            )
            await self._cancel_in_flight()

    async def _cancel_in_flight(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- reading the stream ---------------------------------------------------------

    async def _loop(self, burst: bool) -> None:
        while not self._stop.is_set():
            try:
                if not self._group_ready:
                    await self._ensure_group()
                if await self._read_once(burst):
                    continue
                if burst:
                    if not self._tasks and await self._group_idle():
                        logger.info("worker %s: burst done, no work left", self.consumer)
                        return
                    await self._wait_for_tasks(BURST_POLL_SECS)
            except REDIS_DOWN_ERRORS as exc:
                raise_if_cancelled()
                logger.warning("worker %s: Redis unavailable (%s); retrying in %s s",
                               self.consumer, exc, REDIS_RETRY_SECS)
                # A reply lost with the connection may have delivered entries to us.
                self._read_history = True
                self._history_cursor = "0"
                await self._sleep_unless_stopped(REDIS_RETRY_SECS)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream or group vanished (Redis restarted without its data).
                    logger.warning("worker %s: consumer group missing; creating it again",
                                   self.consumer)
                    self._group_ready = False
                else:
                    # E.g. OOM or a read-only replica: an operator's problem, not a
                    # reason to exit and lose the orders in flight.
                    logger.warning("worker %s: Redis refused a command (%s); retrying in %s s",
                                   self.consumer, exc, REDIS_RETRY_SECS)
                    await self._sleep_unless_stopped(REDIS_RETRY_SECS)

    async def _read_once(self, burst: bool) -> bool:
        """Take whatever work fits in the free slots; False if there was none."""
        capacity = self.concurrency - len(self._tasks)
        if capacity <= 0:
            await self._wait_for_tasks(self._block_ms / 1000)
            return True
        if self._read_history and await self._resume_own(capacity):
            return True
        if time.monotonic() >= self._next_claim_at:
            self._next_claim_at = time.monotonic() + self._claim_interval_secs
            if await self._claim_stale(capacity):
                return True
        response = await self.redis.xreadgroup(
            keys.EXECUTORS_GROUP,
            self.consumer,
            {keys.ORDERS_STREAM: ">"},
            count=capacity,
            block=None if burst else self._block_ms,
        )
        entries = _stream_entries(response)
        for entry_id, fields in entries:
            self._dispatch(entry_id, fields, deliveries=1)
        return bool(entries)

    async def _resume_own(self, capacity: int) -> bool:
        """Read this consumer's own pending entries (delivered, never acknowledged)."""
        response = await self.redis.xreadgroup(
            keys.EXECUTORS_GROUP,
            self.consumer,
            {keys.ORDERS_STREAM: self._history_cursor},
            count=capacity,
        )
        entries = _stream_entries(response)
        if not entries:
            self._read_history = False
            self._history_cursor = "0"
            return False
        self._history_cursor = entries[-1][0]
        for entry_id, fields in entries:
            if entry_id in self._tasks:
                continue
            deliveries = await self._deliveries(entry_id)
            if deliveries is None:
                continue
            logger.info("worker %s: resuming own pending entry %s", self.consumer, entry_id)
            self._dispatch(entry_id, fields, deliveries)
        return True

    async def _claim_stale(self, capacity: int) -> bool:
        """XAUTOCLAIM entries idle longer than claim_idle_ms (their worker is gone)."""
        response = await self.redis.xautoclaim(
            keys.ORDERS_STREAM,
            keys.EXECUTORS_GROUP,
            self.consumer,
            min_idle_time=self.config.claim_idle_ms,
            start_id=self._claim_cursor,
            count=capacity,
        )
        # Redis 6.2 answers [cursor, entries]; 7+ adds a list of deleted ids.
        self._claim_cursor = response[0]
        claimed = False
        for entry_id, fields in response[1]:
            if entry_id is None:
                # Redis 6.2 returns a deleted entry as nil; reading our own pending
                # list shows its id, so it can be dead-lettered and acknowledged.
                self._read_history = True
                continue
            if entry_id in self._tasks:
                continue  # ours and still in flight: the heartbeat was late
            deliveries = await self._deliveries(entry_id)
            if deliveries is None:
                continue  # finished and acknowledged by its task while we claimed it
            logger.info("worker %s: claimed stale entry %s (delivery %s)",
                        self.consumer, entry_id, deliveries)
            self._dispatch(entry_id, fields, deliveries)
            claimed = True
        if self._claim_cursor != "0-0":
            # More to scan: do not wait a whole interval for the next round.
            self._next_claim_at = 0.0
        return claimed

    async def _deliveries(self, entry_id: str) -> int | None:
        """How many times the group delivered this entry; None if it is no longer
        pending (acknowledged since it was read: a claim that raced our own XACK)."""
        rows = await self.redis.xpending_range(
            keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else None

    async def _group_idle(self) -> bool:
        """Nothing pending in the whole group (burst mode's end)."""
        summary = await self.redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
        return int(summary["pending"]) == 0

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(
                keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True
            )
            logger.info("created consumer group %s on %s", keys.EXECUTORS_GROUP, keys.ORDERS_STREAM)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _heartbeat(self) -> None:
        """Keep in-flight entries from looking idle, so no one claims them from us."""
        interval = self.config.claim_idle_ms / 3000
        # Stopped by the event, not only by cancel(): a cancel that lands inside a
        # redis-py call can come out as a connection error (see raise_if_cancelled).
        while not self._heartbeat_stop.is_set():
            try:
                await asyncio.wait_for(self._heartbeat_stop.wait(), interval)
                return
            except TimeoutError:
                pass
            ids: list[Any] = list(self._tasks)
            try:
                # For metrics: this worker is alive, with this many orders in flight.
                await self.redis.set(
                    keys.worker(self.consumer), self._record(len(ids)),
                    px=max(int(interval * 3000), 1000),
                )
                if not ids:
                    continue
                lost = await self._keep_owned(
                    keys=[keys.ORDERS_STREAM], args=[keys.EXECUTORS_GROUP, self.consumer, *ids]
                )
                for entry_id in lost:
                    task = self._tasks.get(entry_id)
                    if task is not None:
                        logger.warning("worker %s: entry %s was taken over by another worker; "
                                       "dropping it", self.consumer, entry_id)
                        task.cancel()
            except (*REDIS_DOWN_ERRORS, ResponseError) as exc:
                raise_if_cancelled()
                logger.warning("worker %s: heartbeat failed: %s", self.consumer, exc)

    async def _wait_for_tasks(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(
                set(self._tasks.values()), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        else:
            await self._sleep_unless_stopped(timeout)

    async def _sleep_unless_stopped(self, secs: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), secs)

    def _dispatch(self, entry_id: str, fields: Mapping[str, str] | None, deliveries: int) -> None:
        task = asyncio.create_task(
            self._process(entry_id, dict(fields or {}), deliveries), name=f"entry-{entry_id}"
        )
        self._tasks[entry_id] = task
        task.add_done_callback(lambda t: self._forget(entry_id, t))

    def _forget(self, entry_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(entry_id) is task:
            del self._tasks[entry_id]

    # -- one entry ------------------------------------------------------------------

    async def _process(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        """Drive one entry's order to a terminal status, then acknowledge the entry."""
        order_id = fields.get("id", "")
        # This task's own context: the driver checks, before it sends, that the entry
        # is still ours.
        owner_check.set(functools.partial(self._check_still_owner, entry_id))
        try:
            while True:
                try:
                    if not order_id:
                        raise PoisonEntry("the entry names no order id")
                    if deliveries > self.config.max_deliveries:
                        await self._give_up(entry_id, order_id, fields, deliveries)
                        return
                    await self.driver.execute(order_id)
                    await self._ack(entry_id)
                    return
                except PoisonEntry as exc:
                    await self._dead_letter(entry_id, fields, str(exc), deliveries)
                    return
                except REDIS_DOWN_ERRORS as exc:
                    raise_if_cancelled()
                    # Every step is resumable from the stored status: just go again.
                    logger.warning("order %s: Redis unavailable (%s); retrying in %s s",
                                   order_id, exc, REDIS_RETRY_SECS)
                    await asyncio.sleep(REDIS_RETRY_SECS)
        except LostEntry:
            logger.warning("order %s: entry %s was taken over by another worker; not sending",
                           order_id, entry_id)
        except asyncio.CancelledError:
            logger.info("order %s: interrupted; entry %s stays pending", order_id, entry_id)
            raise
        except Exception:
            # The task boundary: the entry stays pending, is claimed again once idle,
            # and is dead-lettered after max_deliveries.
            logger.exception("order %s: unexpected error; entry %s stays pending", order_id, entry_id)

    async def _ack(self, entry_id: str) -> None:
        # Deleting the entry with its acknowledgement keeps orders:new short without
        # ever trimming an entry that is still pending.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, entry_id)
            pipe.xdel(keys.ORDERS_STREAM, entry_id)
            await pipe.execute()

    async def _dead_letter(
        self, entry_id: str, fields: Mapping[str, str], reason: str, deliveries: int
    ) -> None:
        logger.warning("entry %s (order %s): dead-lettered: %s",
                       entry_id, fields.get("id", "-"), reason)
        record = {
            "entry_id": entry_id,
            "order_id": fields.get("id", ""),
            "reason": reason,
            "deliveries": str(deliveries),
            "consumer": self.consumer,
            "fields": json.dumps(dict(fields), sort_keys=True),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.DEAD_LETTER_STREAM, record,  # type: ignore[arg-type]
                      maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, entry_id)
            pipe.xdel(keys.ORDERS_STREAM, entry_id)
            pipe.hincrby(keys.COUNTERS, "dead_letters", 1)
            await pipe.execute()

    async def _give_up(
        self, entry_id: str, order_id: str, fields: Mapping[str, str], deliveries: int
    ) -> None:
        """An entry that keeps coming back: fail its order, dead-letter the entry.

        An order whose transaction may have gone out is not failed (that could report
        a trade that executed as failed): the venue is asked for the outcome for a
        bounded time, and the order finishes with it. Only if that fails too is the
        entry set aside for an operator, who finds the tx_hash on the order.
        """
        reason = (
            f"Order could not be processed: delivered {deliveries} times "
            f"(limit {self.config.max_deliveries}); set aside for an operator"
        )
        if await self.driver.give_up(order_id, reason):
            await self._ack(entry_id)
            return
        await self._dead_letter(entry_id, fields, reason, deliveries)

    async def _check_still_owner(self, entry_id: str) -> None:
        """Raise LostEntry if another worker has claimed the entry (the driver calls
        this just before a transaction is sent: a worker that was frozen past
        claim_idle_ms must not send what the worker that took over is sending)."""
        lost = await self._keep_owned(
            keys=[keys.ORDERS_STREAM], args=[keys.EXECUTORS_GROUP, self.consumer, entry_id]
        )
        if lost:
            raise LostEntry(entry_id)


def _stream_entries(response: Any) -> list[tuple[str, dict[str, str] | None]]:
    """The entries of an XREADGROUP answer (RESP2: [[stream, [(id, fields), ...]]])."""
    entries: list[tuple[str, dict[str, str] | None]] = []
    for _stream, batch in response or ():
        entries.extend(batch)
    return entries
