"""The orders stream's consumer: lease, read, claim, heartbeat, dispatch, ack, dead letters.

The orders-stream entry is acknowledged (and deleted) only after its order reached a
terminal status: in the same atomic step when this worker set that status
(OrderStore.transition with ``owned_by``), else just after. Until then it sits in
the group's pending list: a worker's own entries are resumed when it starts, entries
of a dead worker are taken over with XAUTOCLAIM once idle for ``claim_idle_ms``, and
a live worker keeps its entries fresh (XCLAIM JUSTID) so they are not taken from it
while it waits for a slow confirmation.
An entry delivered more than ``max_deliveries`` times, or one that names no order,
goes to the dead-letter stream; its order (if any) is failed with a reason. What
happens to the order itself is the driver's business (engine.execution.driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.core import keys
from engine.core.config import Config
from engine.core.connections import REDIS_DOWN_ERRORS, raise_if_cancelled
from engine.core.store import OrderStore
from engine.execution.driver import (
    OrderDriver,
    PoisonEntry,
    entry_acknowledged,
    owner_check,
    owner_entry,
)
from engine.execution.group import OrderGroup
from engine.execution.lease import REDIS_RETRY_SECS, ConsumerLease

logger = logging.getLogger(__name__)

# XREADGROUP BLOCK: short enough that a stop request or an XAUTOCLAIM round is never
# far away, and well below the client's socket timeout (redis_timeout_secs + block).
READ_BLOCK_MS = 1000
# The longest wait for the heartbeat task to end when the worker stops.
HEARTBEAT_STOP_SECS = 2.0
# XAUTOCLAIM at least this often, whatever claim_idle_ms is.
CLAIM_INTERVAL_MAX_SECS = 5.0
# Burst mode: how often to look again while other workers still hold pending entries.
BURST_POLL_SECS = 0.05

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
        # The per-order commands (ownership checks, acknowledgements) take the
        # store's hot path: the pipelined connection, when the worker has one.
        self.lease = ConsumerLease(redis, config, self.consumer, driver.store.hot)
        self.group = OrderGroup(redis, self.consumer, driver.store.hot)
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
        await self.lease.acquire(self._stop)
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
            await self.lease.release()
        logger.info("worker %s: stopped", self.consumer)

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
                    if not self._tasks and await self.group.idle():
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
        entries = await self.group.read_new(capacity, None if burst else self._block_ms)
        for entry_id, fields in entries:
            self._dispatch(entry_id, fields, deliveries=1)
        return bool(entries)

    async def _resume_own(self, capacity: int) -> bool:
        """Read this consumer's own pending entries (delivered, never acknowledged)."""
        entries = await self.group.read_own(self._history_cursor, capacity)
        if not entries:
            self._read_history = False
            self._history_cursor = "0"
            return False
        self._history_cursor = entries[-1][0]
        for entry_id, fields in entries:
            if entry_id in self._tasks:
                continue
            deliveries = await self.group.deliveries(entry_id)
            if deliveries is None:
                continue
            logger.info("worker %s: resuming own pending entry %s", self.consumer, entry_id)
            self._dispatch(entry_id, fields, deliveries)
        return True

    async def _claim_stale(self, capacity: int) -> bool:
        """XAUTOCLAIM entries idle longer than claim_idle_ms (their worker is gone)."""
        self._claim_cursor, entries = await self.group.claim_idle(
            self.config.claim_idle_ms, self._claim_cursor, capacity
        )
        claimed = False
        for entry_id, fields in entries:
            if entry_id is None:
                # Redis 6.2 returns a deleted entry as nil; reading our own pending
                # list shows its id, so it can be dead-lettered and acknowledged.
                self._read_history = True
                continue
            if entry_id in self._tasks:
                continue  # ours and still in flight: the heartbeat was late
            deliveries = await self.group.deliveries(entry_id)
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

    async def _ensure_group(self) -> None:
        await self.group.ensure()
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
            try:
                # Also for metrics: this worker is alive, with this many in flight.
                lost = await self.lease.beat(list(self._tasks), max(int(interval * 3000), 1000))
                for entry_id in lost:
                    task = self._tasks.get(entry_id)
                    # A finished task's entry went with its terminal status (it is
                    # forgotten a pass later): not taken over.
                    if task is not None and not task.done():
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
        owner_entry.set((entry_id, self.consumer))
        try:
            while True:
                try:
                    if not order_id:
                        raise PoisonEntry("the entry names no order id")
                    if deliveries > self.config.max_deliveries:
                        await self._give_up(entry_id, order_id, fields, deliveries)
                        return
                    entry_acknowledged.set(False)
                    await self.driver.execute(order_id)
                    if not entry_acknowledged.get():  # else done with the terminal status
                        await self.group.ack(entry_id)
                    return
                except PoisonEntry as exc:
                    await self.group.dead_letter(entry_id, fields, str(exc), deliveries)
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
            await self.group.ack(entry_id)
            return
        await self.group.dead_letter(entry_id, fields, reason, deliveries)

    async def _check_still_owner(self, entry_id: str) -> None:
        """Raise LostEntry if another worker has claimed the entry (the driver calls
        this just before a transaction is recorded or sent: a worker that was frozen
        past claim_idle_ms must not send what the worker that took over is sending;
        its status changes are checked in their own atomic step, see owner_entry)."""
        if not await self.lease.owns(entry_id):
            raise LostEntry(entry_id)
