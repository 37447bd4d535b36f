"""The execution worker, against a real Redis: state machine, retries, recovery, processes.

The simulated blockchain is forced where a test needs it (a manual clock, a price
shock, a venue wrapper that fails or blocks); Redis is always the real thing.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from engine.core import amounts, keys, strict_json
from engine.core.config import PROJECT_ROOT, Config
from engine.core.connections import connect, connect_pipelined
from engine.core.status import TERMINAL
from engine.core.store import OrderStore, Recorded
from engine.execution.consumer import Consumer
from engine.execution.driver import MAX_ATTEMPTS, slippage_reason
from engine.execution.services import build_worker
from engine.execution.venues.base import (
    Quote,
    RecordTx,
    SwapRequest,
    SwapTx,
    TransientVenueError,
    TxStatus,
    Venue,
)
from engine.execution.venues.market import METEORA, RAYDIUM, ManualClock, SimulatedMarket, VenueProfile
from engine.execution.venues.simulated import make_simulated_venues
from engine.ops.redis_server import RedisServer, free_port
from engine.web.schemas import Schemas
from tests.helpers import VALID_ORDER, eventually

TX_HASH = re.compile(r"^0x[0-9a-f]{64}$")
# Generous: a run that takes this long is stuck, not slow.
RUN_TIMEOUT_SECS = 20.0


# -- helpers ---------------------------------------------------------------------------


async def new_order(store: OrderStore, **overrides: Any) -> str:
    order_id = str(uuid.uuid4())
    await store.create(order_id, {**VALID_ORDER, **overrides})
    return order_id


async def messages(store: OrderStore, order_id: str) -> list[dict[str, Any]]:
    """An order's status messages, their numbers exact (Decimal) as the JSON has them."""
    return [strict_json.loads(data) for _seq, data in await store.history(order_id)]


async def statuses(store: OrderStore, order_id: str) -> list[str]:
    return [m["status"] for m in await messages(store, order_id)]


async def status_of(store: OrderStore, order_id: str) -> str:
    order = await store.get(order_id)
    assert order is not None
    return order.status


async def ledger(redis: Redis) -> dict[str, list[dict[str, str]]]:
    """Every ledger entry, by order id."""
    by_order: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    async for key in redis.scan_iter(match=keys.ledger("*")):
        record = cast("dict[str, str]", await redis.hgetall(key))
        by_order[record["order_id"]].append(record)
    return dict(by_order)


async def assert_executed_once(redis: Redis, order_ids: list[str], *, resent: bool = False) -> None:
    """One ledger entry per order, never sent twice (with ``resent``: perhaps sent
    twice, executed once), and nothing else on the ledger."""
    entries = await ledger(redis)
    assert sorted(entries) == sorted(order_ids)
    for order_id, records in entries.items():
        assert len(records) == 1, (order_id, records)
        assert resent or "duplicate_sends" not in records[0], records[0]


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    entries = cast("list[tuple[str, dict[str, str]]]", await redis.xrange(keys.DEAD_LETTER_STREAM))
    return [fields for _id, fields in entries]


async def assert_stream_drained(redis: Redis) -> None:
    assert await redis.xlen(keys.ORDERS_STREAM) == 0
    assert (await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP))["pending"] == 0


async def burst(executor: Consumer) -> None:
    await asyncio.wait_for(executor.run(burst=True), RUN_TIMEOUT_SECS)


def executor_for(
    redis: Redis,
    config: Config,
    *,
    market: SimulatedMarket | None = None,
    venues: dict[str, Venue] | None = None,
    **kwargs: Any,
) -> Consumer:
    return build_worker(
        redis,
        config,
        venues=venues,
        market=market,
        retry_backoff_secs=kwargs.pop("retry_backoff_secs", 0.01),
        status_poll_secs=kwargs.pop("status_poll_secs", 0.01),
        **kwargs,
    )


class WrappedVenue:
    """A simulated venue whose calls a test can make fail or block (its blockchain, forced)."""

    def __init__(self, inner: Venue) -> None:
        self.inner = inner
        self.failures: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        # Where to block: "before_send", "after_send" or "status"; None for nowhere.
        self.block_at: str | None = None
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()

    @property
    def name(self) -> str:
        return self.inner.name

    async def _gate(self, point: str) -> None:
        if self.block_at == point:
            self.blocked.set()
            await self.release.wait()

    def _fail(self, operation: str) -> None:
        self.calls[operation] += 1
        if self.failures[operation] > 0:
            self.failures[operation] -= 1
            raise TransientVenueError(f"{self.name}: {operation} failed (forced)")

    async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        self._fail("quote")
        return await self.inner.quote(token_in, token_out, amount_in)

    async def send(self, tx: SwapTx) -> str:
        self._fail("send")
        await self._gate("before_send")
        tx_hash = await self.inner.send(tx)
        await self._gate("after_send")
        return tx_hash

    async def build(self, swap: SwapRequest, record: RecordTx) -> SwapTx | None:
        return await self.inner.build(swap, record)

    async def speed_up(self, tx: SwapTx, record: RecordTx) -> SwapTx | None:
        return await self.inner.speed_up(tx, record)

    async def status(self, tx: SwapTx) -> TxStatus:
        self._fail("status")
        await self._gate("status")
        return await self.inner.status(tx)


def wrapped_venues(
    redis: Redis,
    config: Config,
    market: SimulatedMarket | None = None,
    *,
    block_at: str | None = None,
) -> dict[str, WrappedVenue]:
    """The simulated venues, wrapped. With ``block_at``, every venue blocks there on
    one shared gate: ``venues["raydium"].blocked`` / ``.release`` (whichever wins)."""
    venues = {
        name: WrappedVenue(venue)
        for name, venue in make_simulated_venues(redis, config, market).items()
    }
    gate = venues["raydium"]
    for venue in venues.values():
        venue.block_at = block_at
        venue.blocked, venue.release = gate.blocked, gate.release
    return venues


# -- the happy path --------------------------------------------------------------------


async def test_an_order_goes_through_every_status_to_confirmed(
    redis: Redis, store: OrderStore, config: Config, schemas: Schemas
) -> None:
    order_id = await new_order(store)
    await burst(executor_for(redis, config))

    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "routing", "building", "submitted", "confirmed"]
    assert [m["seq"] for m in history] == [1, 2, 3, 4, 5]
    for message in history:
        assert schemas.errors("status_message", message) == [], message
    _pending, _routing, building, submitted, confirmed = history
    assert building["venue"] in {"raydium", "meteora"}
    assert 200 < building["quoted_price"] < 240
    # Exact amounts: USDC has 6 decimals, and min_amount_out is expected less 5%,
    # rounded down to a whole micro-USDC.
    usdc = amounts.token("USDC")
    expected = usdc.to_base_units(building["expected_amount_out"])
    assert usdc.to_base_units(building["min_amount_out"]) == expected * 95 // 100
    assert TX_HASH.match(submitted["tx_hash"])
    assert confirmed["tx_hash"] == submitted["tx_hash"]
    assert confirmed["venue"] == building["venue"]
    assert confirmed["amount_out"] >= building["min_amount_out"]
    received = usdc.to_base_units(confirmed["amount_out"])  # raises if finer than 1e-6
    assert confirmed["execution_price"] == amounts.price(
        12_500_000_000, amounts.token("SOL"), received, usdc
    )

    order = await store.get(order_id)
    assert order is not None
    assert order.status == "confirmed"
    assert order.tx_hash == submitted["tx_hash"]
    assert order.attempts == 1
    await assert_executed_once(redis, [order_id])
    await assert_stream_drained(redis)


async def test_many_orders_with_bounded_concurrency(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    order_ids = [await new_order(store, amount=float(i + 1)) for i in range(12)]
    executor = executor_for(redis, dataclasses.replace(config, worker_concurrency=3))
    in_flight: list[int] = []
    real_dispatch = executor._dispatch

    def counting_dispatch(*args: Any, **kwargs: Any) -> None:
        real_dispatch(*args, **kwargs)
        in_flight.append(len(executor._tasks))

    executor._dispatch = counting_dispatch  # type: ignore[method-assign]
    await burst(executor)
    assert len(in_flight) == 12 and max(in_flight) == 3  # never more than 3 at once
    for order_id in order_ids:
        assert await statuses(store, order_id) == [
            "pending", "routing", "building", "submitted", "confirmed"
        ]
    await assert_executed_once(redis, order_ids)
    await assert_stream_drained(redis)


async def test_transitions_over_the_pipelined_connection_survive_it_being_killed(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    # worker.py runs its per-order commands over a pipelined connection
    # (engine.core.pipelined.HotPath: the transitions, the ownership checks, the
    # acknowledgements, the venue's ledger). Kill that connection again and again while
    # orders execute: a script whose reply is lost is sent once more, so every order
    # still ends with each status exactly once and one ledger entry.
    pipe = connect_pipelined(config.redis_url or "", config)
    assert pipe is not None
    order_ids = [await new_order(store, amount=float(i + 1)) for i in range(30)]
    executor = executor_for(
        redis, dataclasses.replace(config, worker_concurrency=8),
        store=OrderStore(redis, config, pipe),
    )
    run = asyncio.ensure_future(burst(executor))
    kills = 0
    try:
        while not run.done() and kills < 6:
            await asyncio.sleep(0.01)
            if pipe._connection is not None:
                client_id = int(await pipe.execute("CLIENT", "ID"))
                kills += await redis.client_kill_filter(_id=client_id)
        await run
    finally:
        await pipe.aclose()
    assert kills >= 1  # the run did not end before the first kill
    for order_id in order_ids:
        history = await messages(store, order_id)
        assert [m["status"] for m in history] == [
            "pending", "routing", "building", "submitted", "confirmed"
        ]
        assert [m["seq"] for m in history] == [1, 2, 3, 4, 5]
    # The venue's send goes over the same connection: one whose reply a kill lost is
    # sent again, which the ledger counts, and executes once.
    await assert_executed_once(redis, order_ids, resent=True)
    await assert_stream_drained(redis)


async def test_each_transition_is_logged_with_the_order_id(
    redis: Redis, store: OrderStore, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    order_id = await new_order(store)
    with caplog.at_level(logging.INFO, logger="engine.execution"):
        await burst(executor_for(redis, config))
    lines = [r.getMessage() for r in caplog.records if order_id in r.getMessage() and "->" in r.getMessage()]
    assert [line.split(" -> ")[1].split()[0] for line in lines] == [
        "routing", "building", "submitted", "confirmed"
    ]


# -- failures ----------------------------------------------------------------------------


def test_slippage_reason_has_the_seed_form() -> None:
    def reason(moved: str, limit: str) -> str:
        return slippage_reason(Decimal(moved), Decimal(limit))

    assert reason("0.018", "0.01") == "Price moved 1.8% (max allowed: 1.0%)"
    assert reason("0.1234", "0.05") == "Price moved 12.3% (max allowed: 5.0%)"
    assert reason("0.5004", "0.5") == "Price moved 50.1% (max allowed: 50.0%)"
    # A move just past the limit never reads as within it.
    assert reason("0.0102", "0.01") == "Price moved 1.1% (max allowed: 1.0%)"


async def test_a_price_move_beyond_max_slippage_fails_the_order(
    redis: Redis, store: OrderStore, config: Config, schemas: Schemas
) -> None:
    # Prices only move when the test says so; a transaction lands 1 s after it is sent.
    clock = ManualClock()
    market = SimulatedMarket(config.price_seed, clock, volatility=0)
    slow = dataclasses.replace(config, confirm_latency_min_ms=1000, confirm_latency_max_ms=1000)
    order_id = await new_order(store, max_slippage=0.01)
    run = asyncio.create_task(burst(executor_for(redis, slow, market=market)))

    await eventually(lambda: _has_status(store, order_id, "submitted"), message="submitted")
    market.shock("SOL", 0.982)  # SOL drops 1.8% while the transaction is in flight
    clock.advance(1.0)
    await run

    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "routing", "building", "submitted", "failed"]
    failed = history[-1]
    assert failed["reason"] == "Price moved 1.8% (max allowed: 1.0%)"
    assert failed["tx_hash"] == history[3]["tx_hash"]
    assert schemas.errors("status_message", failed) == []
    records = (await ledger(redis))[order_id]
    assert [r["state"] for r in records] == ["reverted"]
    await assert_stream_drained(redis)


async def _has_status(store: OrderStore, order_id: str, status: str) -> bool:
    order = await store.get(order_id)
    return order is not None and order.status == status


@pytest.mark.parametrize("operation", ["quote", "send", "status"])
async def test_a_transient_venue_failure_is_retried(
    redis: Redis, store: OrderStore, config: Config, operation: str
) -> None:
    venues = wrapped_venues(redis, config)
    for venue in venues.values():
        venue.failures[operation] = 1  # every venue fails once
    order_id = await new_order(store)
    await burst(executor_for(redis, config, venues=dict(venues)))

    assert await statuses(store, order_id) == [
        "pending", "routing", "building", "submitted", "confirmed"
    ]
    order = await store.get(order_id)
    assert order is not None
    # A failed status poll is asked again without using up an attempt: the tx is out.
    assert order.attempts == (1 if operation == "status" else 2)
    await assert_executed_once(redis, [order_id])


async def test_retries_exhausted_fails_the_order_with_a_clear_reason(
    redis: Redis, store: OrderStore, config: Config, schemas: Schemas,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = dataclasses.replace(config, venue_failure_rate=1.0)
    order_id = await new_order(store)
    with caplog.at_level(logging.WARNING, logger="engine.execution"):
        await burst(executor_for(redis, down, retry_backoff_secs=0.01))

    # Exponential backoff between the attempts: 0.01 s, then 0.02 s.
    delays = [re.search(r"retrying in ([0-9.]+) s", r.getMessage()) for r in caplog.records]
    assert [float(m.group(1)) for m in delays if m] == [0.01 * 2**i for i in range(MAX_ATTEMPTS - 1)]

    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "routing", "failed"]
    reason = history[-1]["reason"]
    assert reason.startswith(f"Retries exhausted after {MAX_ATTEMPTS} attempts: ")
    assert "raydium" in reason and "meteora" in reason
    assert schemas.errors("status_message", history[-1]) == []
    order = await store.get(order_id)
    assert order is not None and order.attempts == MAX_ATTEMPTS
    assert await ledger(redis) == {}
    await assert_stream_drained(redis)


async def test_a_send_that_never_gets_through_fails_the_order_once_the_venue_says_so(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    venues = wrapped_venues(redis, config)
    for venue in venues.values():
        venue.failures["send"] = 100
    order_id = await new_order(store)
    await burst(executor_for(redis, config, venues=dict(venues)))

    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "routing", "building", "failed"]
    venue = history[2]["venue"]
    assert history[-1]["reason"] == (
        f"Retries exhausted after {MAX_ATTEMPTS} attempts: {venue}: send failed (forced)"
    )
    # Before failing, the worker asked the venue whether the transaction had landed.
    assert venues[venue].calls["status"] >= 1
    assert await ledger(redis) == {}


async def test_a_pair_no_venue_has_fails_without_retries(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    profiles: tuple[VenueProfile, ...] = tuple(
        dataclasses.replace(profile, pairs=frozenset({("SOL", "USDC")})) for profile in (RAYDIUM, METEORA)
    )
    venues = make_simulated_venues(redis, config, profiles=profiles)
    order_id = await new_order(store, token_in="BONK", token_out="RAY")
    await burst(executor_for(redis, config, venues=dict(venues)))

    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "routing", "failed"]
    assert history[-1]["reason"] == "No venue offers a BONK/RAY pool"
    order = await store.get(order_id)
    assert order is not None and order.attempts == 1


# -- never twice -----------------------------------------------------------------------------


async def test_two_workers_on_one_stream_execute_each_order_once(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    order_ids = [await new_order(store, amount=float(i + 1)) for i in range(20)]
    small = dataclasses.replace(config, worker_concurrency=4)
    first, second = executor_for(redis, small), executor_for(redis, small)
    await asyncio.gather(burst(first), burst(second))

    for order_id in order_ids:
        assert await statuses(store, order_id) == [
            "pending", "routing", "building", "submitted", "confirmed"
        ]
    await assert_executed_once(redis, order_ids)
    await assert_stream_drained(redis)


async def test_two_workers_racing_on_one_order_execute_it_once(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    # The first worker stalls just before sending, for longer than claim_idle_ms and
    # without its heartbeat: the second takes the order over and finishes it. Then the
    # first wakes up and sends too - the ledger must still hold one execution.
    stalled_config = dataclasses.replace(config, claim_idle_ms=60_000)
    taker_config = dataclasses.replace(config, claim_idle_ms=50)
    stalled_venues = wrapped_venues(redis, stalled_config, block_at="before_send")
    order_id = await new_order(store)
    stalled = asyncio.create_task(burst(executor_for(redis, stalled_config, venues=dict(stalled_venues))))
    await asyncio.wait_for(stalled_venues["raydium"].blocked.wait(), RUN_TIMEOUT_SECS)

    await burst(executor_for(redis, taker_config))
    assert await status_of(store, order_id) == "confirmed"
    stalled_venues["raydium"].release.set()
    await stalled

    assert await statuses(store, order_id) == [
        "pending", "routing", "building", "submitted", "confirmed"
    ]
    records = (await ledger(redis))[order_id]
    assert len(records) == 1
    assert records[0]["duplicate_sends"] == "1"  # the stalled worker's late send
    await assert_stream_drained(redis)


@pytest.mark.parametrize("point", ["before_send", "after_send", "status"])
async def test_an_order_interrupted_mid_flight_is_finished_by_another_worker(
    redis: Redis, store: OrderStore, config: Config, point: str
) -> None:
    """The first worker is cancelled with the order's tx_hash recorded (before or after
    the send) or with the order submitted; another worker claims and finishes it."""
    venues = wrapped_venues(redis, config, block_at=point)
    order_id = await new_order(store)
    first = asyncio.create_task(burst(executor_for(redis, config, venues=dict(venues))))
    await asyncio.wait_for(venues["raydium"].blocked.wait(), RUN_TIMEOUT_SECS)

    order = await store.get(order_id)
    assert order is not None and order.tx_hash and TX_HASH.match(order.tx_hash)
    assert order.status == ("submitted" if point == "status" else "building")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # Still pending in the group, owned by the cancelled worker.
    assert (await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP))["pending"] == 1

    second = executor_for(redis, dataclasses.replace(config, claim_idle_ms=50))
    await burst(second)
    history = await messages(store, order_id)
    assert [m["status"] for m in history] == [
        "pending", "routing", "building", "submitted", "confirmed"
    ]
    assert history[-1]["tx_hash"] == order.tx_hash
    await assert_executed_once(redis, [order_id])
    await assert_stream_drained(redis)


async def test_a_restarted_consumer_resumes_its_own_pending_entries_first(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    order_id = await new_order(store)
    await redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True)
    # Delivered to "w1", which then died before doing anything.
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "w1", {keys.ORDERS_STREAM: ">"})
    # claim_idle_ms is long: only the own-pending read can pick this up.
    patient = dataclasses.replace(config, claim_idle_ms=600_000)
    await burst(executor_for(redis, patient, consumer="w1"))
    assert await status_of(store, order_id) == "confirmed"
    await assert_stream_drained(redis)


# -- poison and dead letters --------------------------------------------------------------


async def test_malformed_entries_are_dead_lettered(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    order_id = await new_order(store)
    no_id = str(await redis.xadd(keys.ORDERS_STREAM, {"oops": "1"}))
    unknown = str(await redis.xadd(keys.ORDERS_STREAM, {"id": "no-such-order"}))
    await burst(executor_for(redis, config))

    assert await status_of(store, order_id) == "confirmed"
    dead = {fields["entry_id"]: fields for fields in await dead_letters(redis)}
    assert sorted(dead) == sorted([no_id, unknown])
    assert dead[no_id]["reason"] == "the entry names no order id"
    assert json.loads(dead[no_id]["fields"]) == {"oops": "1"}
    assert dead[unknown]["reason"] == "unknown order id 'no-such-order'"
    assert dead[unknown]["order_id"] == "no-such-order"
    await assert_stream_drained(redis)


async def test_an_entry_delivered_too_often_is_dead_lettered_and_its_order_failed(
    redis: Redis, store: OrderStore, config: Config, schemas: Schemas
) -> None:
    order_id = await new_order(store)
    await redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True)
    # Two workers got this entry and died on it (deliveries 1 and 2).
    [[_stream, [(entry_id, _fields)]]] = cast(
        Any, await redis.xreadgroup(keys.EXECUTORS_GROUP, "dead-1", {keys.ORDERS_STREAM: ">"})
    )
    await redis.xclaim(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, "dead-2", 0, [entry_id])
    limited = dataclasses.replace(config, max_deliveries=2, claim_idle_ms=50)
    await burst(executor_for(redis, limited))  # its claim is delivery 3

    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "failed"]
    assert history[-1]["reason"] == (
        "Order could not be processed: delivered 3 times (limit 2); set aside for an operator"
    )
    assert schemas.errors("status_message", history[-1]) == []
    [dead] = await dead_letters(redis)
    assert dead["entry_id"] == entry_id and dead["order_id"] == order_id
    assert dead["deliveries"] == "3"
    assert await ledger(redis) == {}
    await assert_stream_drained(redis)


async def test_a_claim_that_races_the_entrys_acknowledgement_is_not_dispatched(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    # XAUTOCLAIM answers with an entry, and the task that owned it acknowledges it
    # before the answer is handled (seen in the fault suite). Dispatching it again
    # would count a delivery that never failed.
    await new_order(store)
    await redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True)
    [[_stream, [(entry_id, _fields)]]] = cast(
        Any, await redis.xreadgroup(keys.EXECUTORS_GROUP, "other", {keys.ORDERS_STREAM: ">"})
    )
    executor = executor_for(redis, dataclasses.replace(config, claim_idle_ms=0))
    real_xautoclaim = executor.redis.xautoclaim

    async def xautoclaim_then_acked(*args: Any, **kwargs: Any) -> Any:
        answer = await real_xautoclaim(*args, **kwargs)
        await redis.xack(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, entry_id)
        return answer

    executor.redis.xautoclaim = xautoclaim_then_acked  # type: ignore[method-assign]
    await executor._ensure_group()
    assert await executor._claim_stale(10) is False
    assert executor._tasks == {}


async def test_a_worker_with_a_fixed_name_waits_for_its_predecessor_then_resumes_its_orders(
    redis: Redis, store: OrderStore, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    # "worker.1" (WORKER_NAME, or DYNO on a Procfile host) took an order and was
    # killed: its entry is pending under its name and its record has not expired
    # yet. The new worker.1 must not run beside a live namesake, so it waits for the
    # record, then resumes the entry as its own: no CLAIM_IDLE_MS wait for the claim.
    order_id = await new_order(store)
    await redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True)
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "worker.1", {keys.ORDERS_STREAM: ">"})
    await redis.set(keys.worker("worker.1"), json.dumps({"in_flight": 1, "pid": 1, "token": "old"}),
                    px=600)
    named = dataclasses.replace(config, worker_name="worker.1", claim_idle_ms=600_000)
    executor = executor_for(redis, named)
    assert executor.consumer == "worker.1"
    with caplog.at_level(logging.INFO, logger="engine.execution"):
        run = asyncio.create_task(burst(executor))
        await eventually(lambda: "another process of this name is alive" in caplog.text,
                         message="the wait is logged")
        assert await status_of(store, order_id) == "pending"  # nothing runs meanwhile
        await run
    assert await status_of(store, order_id) == "confirmed"
    assert "resuming own pending entry" in caplog.text
    assert await redis.exists(keys.worker("worker.1")) == 0  # let go on the way out
    await assert_executed_once(redis, [order_id])
    await assert_stream_drained(redis)


async def _submitted_order_delivered_twice(redis: Redis, store: OrderStore) -> str:
    order_id = await new_order(store)
    for status, fields in (
        ("routing", {}),
        ("building", {"venue": "raydium", "quoted_price": 220.0, "min_amount_out": 2000.0}),
    ):
        assert (await store.transition(order_id, status, **fields)).applied
    order = await store.get(order_id)
    assert order is not None
    request = order.parsed_request()
    # Recorded (as the driver does before sending) but never sent: the venue lost it.
    tx = SwapTx.build(order_id, "raydium", request.token_in.symbol, request.token_out.symbol,
                      request.amount_in, request.token_out.to_base_units(Decimal(2000)))
    assert await store.record_tx(order_id, tx.tx_hash, tx.record()) is Recorded.RECORDED
    assert (await store.transition(order_id, "submitted", tx_hash=tx.tx_hash, venue="raydium")).applied
    await redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True)
    [[_stream, [(entry_id, _fields)]]] = cast(
        Any, await redis.xreadgroup(keys.EXECUTORS_GROUP, "dead-1", {keys.ORDERS_STREAM: ">"})
    )
    await redis.xclaim(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, "dead-2", 0, [entry_id])
    return order_id


async def test_a_submitted_order_whose_entry_keeps_failing_finishes_from_the_venue(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    # Its transaction is out: failing it could hide an executed trade. The venue is
    # asked instead, and the order ends as the venue says.
    order_id = await _submitted_order_delivered_twice(redis, store)
    limited = dataclasses.replace(config, max_deliveries=2, claim_idle_ms=50)
    await burst(executor_for(redis, limited))
    assert await status_of(store, order_id) == "confirmed"
    assert await dead_letters(redis) == []
    await assert_executed_once(redis, [order_id])
    await assert_stream_drained(redis)


async def test_a_submitted_order_the_venue_cannot_settle_is_left_to_an_operator(
    redis: Redis, store: OrderStore, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.execution.driver

    monkeypatch.setattr(engine.execution.driver, "GIVE_UP_SETTLE_SECS", 0.3)
    order_id = await _submitted_order_delivered_twice(redis, store)
    venues = wrapped_venues(redis, config)
    for venue in venues.values():
        venue.failures["status"] = 10**6  # the venue never answers
    limited = dataclasses.replace(config, max_deliveries=2, claim_idle_ms=50)
    await burst(executor_for(redis, limited, venues=dict(venues)))
    assert await status_of(store, order_id) == "submitted"  # never reported failed
    [dead] = await dead_letters(redis)
    assert dead["order_id"] == order_id
    await assert_stream_drained(redis)


# -- shutdown and Redis trouble ---------------------------------------------------------------


async def test_stop_lets_in_flight_orders_finish(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    venues = wrapped_venues(redis, config, block_at="status")
    order_id = await new_order(store)
    executor = executor_for(redis, config, venues=dict(venues))
    run = asyncio.create_task(executor.run())
    await asyncio.wait_for(venues["raydium"].blocked.wait(), RUN_TIMEOUT_SECS)

    executor.stop()
    venues["raydium"].release.set()  # the confirmation arrives during the grace period
    await asyncio.wait_for(run, RUN_TIMEOUT_SECS)
    assert await status_of(store, order_id) == "confirmed"
    await assert_stream_drained(redis)


async def test_orders_unfinished_after_the_grace_period_stay_pending(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    venues = wrapped_venues(redis, config, block_at="status")
    order_id = await new_order(store)
    short_grace = dataclasses.replace(config, shutdown_grace_secs=0.05)
    executor = executor_for(redis, short_grace, venues=dict(venues))
    run = asyncio.create_task(executor.run())
    await asyncio.wait_for(venues["raydium"].blocked.wait(), RUN_TIMEOUT_SECS)

    executor.stop()
    await asyncio.wait_for(run, RUN_TIMEOUT_SECS)  # returns, does not raise
    assert executor.in_flight == 0
    assert await status_of(store, order_id) == "submitted"
    assert (await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP))["pending"] == 1

    await burst(executor_for(redis, dataclasses.replace(config, claim_idle_ms=50)))
    assert await status_of(store, order_id) == "confirmed"
    await assert_executed_once(redis, [order_id])


async def test_redis_down_is_retried_not_fatal(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = connect(f"redis://127.0.0.1:{free_port()}/0", config)
    executor = executor_for(nowhere, config)
    try:
        with caplog.at_level(logging.WARNING, logger="engine.execution"):
            run = asyncio.create_task(executor.run())
            await eventually(
                lambda: any("Redis unavailable" in r.getMessage() for r in caplog.records),
                message="a warning about Redis",
            )
            assert not run.done()
            executor.stop()
            await asyncio.wait_for(run, RUN_TIMEOUT_SECS)
    finally:
        await nowhere.aclose()


# -- worker.py as a process ---------------------------------------------------------------------


# Every variable Config.from_env reads.
_SETTINGS = {f.name.upper() for f in dataclasses.fields(Config)} | {"SERVER_PORT", "PORT"}


def worker_env(redis_url: str | None, **settings: str) -> dict[str, str]:
    # Only this test's settings: none inherited from the shell running pytest.
    env = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    env.update(
        QUOTE_LATENCY_MS="0",
        VENUE_FAILURE_RATE="0",
        CONFIRM_LATENCY_MIN_MS="0",
        CONFIRM_LATENCY_MAX_MS="0",
        LOG_LEVEL="INFO",
    )
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(settings)
    return env


class WorkerProcess:
    """``python worker.py`` with its output in a file (shown when a test fails)."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "worker.py")],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait(self, timeout: float = RUN_TIMEOUT_SECS) -> int:
        try:
            await eventually(
                lambda: self.proc.poll() is not None, timeout=timeout, message="worker exit"
            )
            return self.proc.wait()
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for process in started:
        process.close()


def _run_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "worker.py")],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECS,
        check=False,
    )


def test_worker_needs_redis_url() -> None:
    result = _run_worker(worker_env(None))
    assert result.returncode == 2
    assert "REDIS_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_bad_setting_exits_2_with_one_line(redis_server: RedisServer) -> None:
    result = _run_worker(worker_env(redis_server.url, WORKER_CONCURRENCY="lots"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "worker: configuration error: WORKER_CONCURRENCY='lots': must be a whole number"
    ]


async def test_worker_process_finishes_in_flight_orders_on_sigterm(
    redis: Redis, store: OrderStore, config: Config, tmp_path: Path,
    processes: list[WorkerProcess],
) -> None:
    assert config.redis_url is not None
    order_id = await new_order(store)
    worker = WorkerProcess(
        tmp_path / "worker.log",
        worker_env(config.redis_url, CONFIRM_LATENCY_MIN_MS="500", CONFIRM_LATENCY_MAX_MS="500"),
    )
    processes.append(worker)
    await eventually(lambda: _has_status(store, order_id, "submitted"), message="submitted")

    worker.proc.send_signal(signal.SIGTERM)
    code = await worker.wait()
    assert code == 0, worker.output()
    assert await status_of(store, order_id) == "confirmed", worker.output()
    assert "SIGTERM received" in worker.output()
    await assert_stream_drained(redis)


async def test_a_killed_worker_process_is_replaced_and_every_order_executes_once(
    redis: Redis, store: OrderStore, config: Config, tmp_path: Path,
    processes: list[WorkerProcess],
) -> None:
    assert config.redis_url is not None
    order_ids = [await new_order(store, amount=float(i + 1)) for i in range(10)]
    # Transactions take 2 s to land, so the kill certainly comes mid-flight.
    slow = {"CONFIRM_LATENCY_MIN_MS": "2000", "CONFIRM_LATENCY_MAX_MS": "2000"}
    first = WorkerProcess(tmp_path / "first.log", worker_env(config.redis_url, **slow))
    processes.append(first)

    async def any_submitted() -> bool:
        return any([await _has_status(store, o, "submitted") for o in order_ids])

    await eventually(any_submitted, message="an order submitted")
    first.proc.send_signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    in_flight = [o for o in order_ids if await status_of(store, o) not in TERMINAL]
    assert in_flight, "the kill came too late to test anything"

    second = WorkerProcess(
        tmp_path / "second.log", worker_env(config.redis_url, CLAIM_IDLE_MS="200", **slow)
    )
    processes.append(second)

    async def all_done() -> bool:
        return all([await status_of(store, o) in TERMINAL for o in order_ids])

    await eventually(all_done, timeout=RUN_TIMEOUT_SECS, message="every order finished")
    second.proc.send_signal(signal.SIGTERM)
    assert await second.wait() == 0, second.output()

    for order_id in order_ids:
        assert await statuses(store, order_id) == [
            "pending", "routing", "building", "submitted", "confirmed"
        ], (first.output(), second.output())
    await assert_executed_once(redis, order_ids)
    await assert_stream_drained(redis)


# -- cancelled by the client -----------------------------------------------------------


async def cancel(store: OrderStore, order_id: str) -> bool:
    from handlers.orders import cancel as cancel_order  # what DELETE does

    return (await cancel_order(store, order_id)).applied


async def test_a_cancelled_pending_order_is_dropped_unsent(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    order_id = await new_order(store)
    assert await cancel(store, order_id)
    await burst(executor_for(redis, config))
    assert await statuses(store, order_id) == ["pending", "failed"]
    assert await ledger(redis) == {}
    await assert_stream_drained(redis)


class QuoteGate(WrappedVenue):
    """Holds every quote until released: the order sits in ``routing``."""

    async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        self.blocked.set()
        await self.release.wait()
        return await self.inner.quote(token_in, token_out, amount_in)


async def test_an_order_cancelled_while_routing_is_never_sent(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    venues = {name: QuoteGate(v) for name, v in make_simulated_venues(redis, config).items()}
    gate = venues["raydium"]
    for venue in venues.values():
        venue.blocked, venue.release = gate.blocked, gate.release
    order_id = await new_order(store)
    worker = asyncio.create_task(burst(executor_for(redis, config, venues=dict(venues))))
    await asyncio.wait_for(gate.blocked.wait(), RUN_TIMEOUT_SECS)
    assert await status_of(store, order_id) == "routing"
    assert await cancel(store, order_id)
    gate.release.set()
    await worker
    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "routing", "failed"]
    assert history[-1]["reason"] == "cancelled by client"
    assert await ledger(redis) == {}
    await assert_stream_drained(redis)


async def test_a_cancel_that_lands_while_building_wins_if_nothing_is_recorded_yet(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    # The worker has moved the order to building and is about to record its
    # transaction when the client's DELETE lands: the record is refused, so nothing
    # is sent, and the order ends as the client asked.
    order_id = await new_order(store)
    executor = executor_for(redis, config)
    real_record = executor.store.record_tx

    async def cancelled_first(oid: str, tx_hash: str, *args: Any, **kwargs: Any) -> Recorded:
        assert await status_of(store, oid) == "building"
        assert await cancel(store, oid)
        return await real_record(oid, tx_hash, *args, **kwargs)

    executor.store.record_tx = cancelled_first  # type: ignore[method-assign]
    await burst(executor)
    history = await messages(store, order_id)
    assert [m["status"] for m in history] == ["pending", "routing", "building", "failed"]
    assert history[-1]["reason"] == "cancelled by client"
    assert await ledger(redis) == {}
    await assert_stream_drained(redis)


async def test_a_cancel_after_the_transaction_is_recorded_is_refused(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    venues = wrapped_venues(redis, config, block_at="before_send")
    order_id = await new_order(store)
    worker = asyncio.create_task(burst(executor_for(redis, config, venues=dict(venues))))
    await asyncio.wait_for(venues["raydium"].blocked.wait(), RUN_TIMEOUT_SECS)
    order = await store.get(order_id)
    assert order is not None and order.status == "building" and order.tx_hash
    assert not await cancel(store, order_id)  # the trade may go out: too late
    venues["raydium"].release.set()
    await worker
    assert await status_of(store, order_id) == "confirmed"
    await assert_executed_once(redis, [order_id])


async def test_a_worker_frozen_before_sending_does_not_send_after_a_takeover(
    redis: Redis, store: OrderStore, config: Config
) -> None:
    # Worker A freezes (a GC pause, SIGSTOP) with the tx_hash recorded and the send
    # next, for longer than claim_idle_ms. Worker B takes the order over and sends.
    # When A wakes, it finds the entry is no longer its own and sends nothing.
    frozen, thaw = asyncio.Event(), asyncio.Event()
    stalled = executor_for(redis, dataclasses.replace(config, claim_idle_ms=60_000))
    real_check = stalled._check_still_owner

    async def freeze_then_check(entry_id: str) -> None:
        frozen.set()
        await thaw.wait()
        await real_check(entry_id)

    stalled._check_still_owner = freeze_then_check  # type: ignore[method-assign]
    order_id = await new_order(store)
    task_a = asyncio.create_task(burst(stalled))
    await asyncio.wait_for(frozen.wait(), RUN_TIMEOUT_SECS)

    await burst(executor_for(redis, dataclasses.replace(config, claim_idle_ms=50)))
    assert await status_of(store, order_id) == "confirmed"
    thaw.set()
    await task_a

    records = (await ledger(redis))[order_id]
    assert len(records) == 1
    assert records[0].get("duplicate_sends", "0") == "0"  # A did not send again
    assert await statuses(store, order_id) == ["pending", "routing", "building", "submitted", "confirmed"]


async def test_the_heartbeat_does_not_take_a_finished_tasks_entry_for_a_lost_one(
    redis: Redis, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    # A terminal status acknowledges its entry in the same step, and the task is
    # forgotten a pass after it ends: a heartbeat in between finds the entry gone.
    # That is not "taken over by another worker" (found by review).
    executor = executor_for(redis, dataclasses.replace(config, claim_idle_ms=300))
    await executor._ensure_group()

    async def finished() -> None:
        return None

    done = asyncio.ensure_future(finished())
    await done
    executor._tasks["1-0"] = done  # its entry is nobody's pending entry any more
    heartbeat = asyncio.ensure_future(executor._heartbeat())
    await asyncio.sleep(0.35)  # three beats
    executor._heartbeat_stop.set()
    await asyncio.wait_for(heartbeat, 2)
    assert "taken over" not in caplog.text
