"""Faults against the real processes: nothing lost, nothing executed twice.

Every test here starts its own redis-server (AOF, ``appendfsync always``), web
processes (``server.py`` with ``REDIS_URL``) and workers (``worker.py``) on loopback,
injects one fault (kill -9, SIGSTOP, a Redis crash, a client that stops reading...)
and then audits Redis: every accepted order finished, each status once and in order,
one ledger entry (one trade) per order, nothing left pending. Each test records what
it measured (see tests/faults/report.py); docs/reliability.md has the figures.

The tests are synchronous and run their own event loop with their own deadline
(``run``), because a whole fault scenario takes longer than the suite's 60 s limit
for one async test would allow in soak mode. ``SOAK=1`` scales every test up.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
from redis.asyncio import Redis
from tornado.httpclient import AsyncHTTPClient

from engine.core import keys
from tests.faults import SOAK, run_scenario, scaled
from tests.faults.audit import (
    Audit,
    audit,
    count_unfinished,
    group_pending,
    histories,
    statuses_now,
)
from tests.faults.clients import (
    RawWebSocket,
    Watch,
    http_client,
    post_order,
    post_orders,
    random_order,
    watch,
)
from tests.faults.cluster import Cluster, ServiceProcess, WebProcess, connections, start_web
from tests.faults.report import Figures
from tests.helpers import AUTH_HEADERS, TEST_KEY_ID, eventually

pytestmark = pytest.mark.slow

# Only a bound on a stuck test: a scenario normally takes a fraction of this.
SCENARIO_TIMEOUT_SECS = scaled(150, 900)
# Orders in flight: confirmations take this long, so hundreds wait at once.
SLOW_CONFIRMS = {"CONFIRM_LATENCY_MIN_MS": "1000", "CONFIRM_LATENCY_MAX_MS": "3000"}
MANY_IN_FLIGHT = {"WORKER_CONCURRENCY": "2000"}
# Generous: a busy machine may take long to finish a few thousand orders.
FINISH_TIMEOUT_SECS = scaled(90, 600)


def run(scenario: Coroutine[Any, Any, None], timeout: float = SCENARIO_TIMEOUT_SECS) -> None:
    run_scenario(scenario, timeout)


async def gauges(http: AsyncHTTPClient, web: WebProcess) -> dict[str, float]:
    """This web process's own gauges from GET /metrics."""
    response = await http.fetch(f"{web.base_url}/metrics")
    values = {}
    for line in response.body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("websockets_open", "status_subscribers"):
            values[name] = float(value)
    return values


async def wait_finished(redis: Redis, order_ids: list[str], cluster: Cluster) -> None:
    """Until every order is terminal and its queue entry acknowledged."""

    async def finished() -> bool:
        return await count_unfinished(redis, order_ids) == 0

    async def drained() -> bool:
        return await group_pending(redis) == 0

    try:
        await eventually(finished, timeout=FINISH_TIMEOUT_SECS, interval=0.2,
                         message="every order finished")
        await eventually(drained, timeout=30, interval=0.1, message="no pending entries")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None


# Subscribers connect this many at a time, each batch subscribed before the next.
SUBSCRIBE_BATCH = 50


async def start_watchers(
    order_ids: list[str], urls: list[str], *, reconnect: bool = True
) -> list[asyncio.Task[Watch]]:
    """A watcher per order, each subscribed (its first status received) on return."""
    tasks: list[asyncio.Task[Watch]] = []
    for start in range(0, len(order_ids), SUBSCRIBE_BATCH):
        batch = order_ids[start : start + SUBSCRIBE_BATCH]
        events = [asyncio.Event() for _ in batch]
        tasks.extend(
            asyncio.ensure_future(watch(order_id, urls, reconnect=reconnect,
                                        timeout=FINISH_TIMEOUT_SECS, connected=event))
            for order_id, event in zip(batch, events, strict=True)
        )
        await eventually(lambda: all(e.is_set() for e in events), timeout=60,  # noqa: B023
                         message="a batch of subscribers connected")
    return tasks


async def status_breakdown(redis: Redis, order_ids: list[str]) -> dict[str, int]:
    return dict(collections.Counter((await statuses_now(redis, order_ids)).values()))


async def unsettled_sends(redis: Redis) -> int:
    """Transactions sent to a venue and not yet executed."""
    count = 0
    async for key in redis.scan_iter(match=keys.ledger("*"), count=1000):
        if await redis.hget(key, "state") == "pending":
            count += 1
    return count


def claims(worker: ServiceProcess) -> dict[str, int]:
    """Entries a worker took over (XAUTOCLAIM), from its log; ``claimed_again``: claims
    of an entry it had claimed already (its own, idle while the loop was busy)."""
    claimed = [line.split("claimed stale entry ")[1].split()[0]
               for line in worker.log_text().splitlines() if "claimed stale entry " in line]
    return {"taken_over": len(set(claimed)), "claimed_again": len(claimed) - len(set(claimed))}


def assert_clean(found: Audit, cluster: Cluster) -> None:
    problems = found.problems()
    assert problems == {}, f"{problems}\n{cluster.logs()}"


# -- 1. kill -9 a worker with hundreds of orders in flight -------------------------------------


IN_FLIGHT_AT_KILL = 500


def test_a_worker_killed_with_hundreds_in_flight_is_replaced_and_nothing_is_lost_or_repeated(
    cluster: Cluster, figures: Figures
) -> None:
    run(_killed_worker(cluster, figures, scaled(700, 2500)))


async def _killed_worker(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        order_ids = await post_orders(http, web.base_url, count)
        # The worker comes after the orders: it takes them all at once.
        first = cluster.start_worker(**SLOW_CONFIRMS, **MANY_IN_FLIGHT)

        async def many_sent() -> bool:
            # Hundreds delivered and unacknowledged, and a good share already sent
            # to a venue: the state a crash can most easily get wrong.
            if await group_pending(redis) < IN_FLIGHT_AT_KILL:
                return False
            return await unsettled_sends(redis) >= count // 3

        await eventually(many_sent, timeout=60, interval=0.02, message="orders in flight")
        assert first.kill() == -signal.SIGKILL
        # Nothing moves until the next worker starts: these figures are exact.
        in_flight = await group_pending(redis)
        at_kill = await status_breakdown(redis, order_ids)
        sent = await unsettled_sends(redis)
        assert in_flight >= IN_FLIGHT_AT_KILL, at_kill

        second = cluster.start_worker(**SLOW_CONFIRMS, **MANY_IN_FLIGHT)
        await wait_finished(redis, order_ids, cluster)
        found = await audit(redis, order_ids)
        assert second.terminate() == 0, second.output()

        figures.record("worker_kill", {
            "orders": count,
            "in_flight_at_kill": in_flight,
            "statuses_at_kill": at_kill,
            "sent_not_executed_at_kill": sent,
            "faults_injected": 1,
            **claims(second),
            "redis_unavailable_warnings": sum(
                w.log_text().count("Redis unavailable") for w in (first, second)),
            **found.figures(),
        })
        assert_clean(found, cluster)
        assert found.orders == count and found.dead_letters == 0


# -- 2. SIGSTOP a worker past the claim time, SIGCONT it after another finished its work ------


def test_a_frozen_worker_resumed_after_a_takeover_repeats_no_status_and_no_trade(
    cluster: Cluster, figures: Figures
) -> None:
    run(_frozen_worker(cluster, figures, scaled(400, 1500)))


async def _frozen_worker(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        order_ids = await post_orders(http, web.base_url, count)
        frozen = cluster.start_worker(**SLOW_CONFIRMS, **MANY_IN_FLIGHT)

        async def half_sent() -> bool:
            return await unsettled_sends(redis) >= count // 2

        await eventually(half_sent, timeout=60, interval=0.02, message="orders sent")
        frozen.freeze()
        at_freeze = await status_breakdown(redis, order_ids)
        in_flight = await group_pending(redis)

        # The other worker takes the frozen one's entries once idle for CLAIM_IDLE_MS.
        rescuer = cluster.start_worker(**SLOW_CONFIRMS, **MANY_IN_FLIGHT)
        await wait_finished(redis, order_ids, cluster)
        before = await histories(redis, order_ids)
        events_before = await redis.xlen(keys.EVENTS_STREAM)
        # The frozen worker's heartbeat key has expired by now; when it beats again,
        # its in-flight count says whether it is still working on its stale orders.
        frozen.thaw()

        async def resumed_and_idle() -> bool:
            async for key in redis.scan_iter(match=keys.worker("*")):
                raw = await redis.get(key)
                state = json.loads(raw) if raw else {}
                if state.get("pid") == frozen.pid:
                    return state.get("in_flight") == 0
            return False

        await eventually(resumed_and_idle, timeout=60, interval=0.1,
                         message="the resumed worker idle")
        assert frozen.alive(), frozen.output()
        after = await histories(redis, order_ids)
        events_after = await redis.xlen(keys.EVENTS_STREAM)
        found = await audit(redis, order_ids)
        assert frozen.terminate() == 0, frozen.output()
        assert rescuer.terminate() == 0, rescuer.output()

        changed = [o for o in order_ids if after[o] != before[o]]
        resumed_log = frozen.log_text()
        figures.record("worker_sigstop", {
            "orders": count,
            "in_flight_at_stop": in_flight,
            "statuses_at_stop": at_freeze,
            "faults_injected": 1,
            **claims(rescuer),
            "statuses_emitted_after_resume": events_after - events_before,
            "orders_changed_after_resume": len(changed),
            "steps_found_done_by_resumed_worker": resumed_log.count(": already "),
            **found.figures(),
        })
        assert changed == [] and events_after == events_before, changed[:5]
        assert found.lost == 0 and found.bad_history == [] and found.executed_twice == []
        assert found.not_executed == [] and found.ledger_mismatch == []
        assert found.pending_entries == 0 and found.queue_length == 0
        # A resumed worker may re-send a transaction it was about to send when frozen;
        # the venue records a tx_hash once, so that is no second trade (counted above).


# Found by this test: the resumed worker's heartbeat XCLAIMed (JUSTID, min-idle 0)
# every entry it had in flight, taking back those the other worker had claimed, so
# two workers drove the same orders. Fixed in 1946502 (sends and heartbeats fenced by
# entry ownership).
def test_a_worker_resumed_after_a_takeover_leaves_the_orders_to_the_other_worker(
    cluster: Cluster, figures: Figures
) -> None:
    run(_resumed_worker(cluster, figures, 400))


async def _resumed_worker(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        order_ids = await post_orders(http, web.base_url, count)
        # The takeover waits for CLAIM_IDLE_MS; 3 s, not the suite's 1 s: with 400
        # orders in flight on two shared cores, the other worker's lease refresh of
        # its entries can lag past 1 s, and the thawed worker would then rightly take
        # those (idle-looking) entries back: a timing, not what this test is about
        # (seen 3 times in ~20 full runs, 9-49 entries).
        settings = {**SLOW_CONFIRMS, **MANY_IN_FLIGHT, "CLAIM_IDLE_MS": "3000"}
        frozen = cluster.start_worker(**settings)
        frozen_consumer = await cluster.wait_worker_ready(frozen, redis)

        async def some_sent() -> bool:
            return await unsettled_sends(redis) >= count // 3

        async def owned_by_frozen() -> int:
            summary = await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
            for consumer in summary.get("consumers") or []:
                if consumer["name"] == frozen_consumer:
                    return int(consumer["pending"])
            return 0

        await eventually(some_sent, timeout=60, interval=0.01, message="orders sent")
        frozen.freeze()
        at_freeze = await status_breakdown(redis, order_ids)
        cluster.start_worker(**settings)

        async def all_taken_over() -> bool:
            return await owned_by_frozen() == 0

        # Thawed once the other worker owns every entry, most orders still confirming.
        await eventually(all_taken_over, timeout=60, interval=0.05, message="takeover")
        unfinished_at_thaw = await count_unfinished(redis, order_ids)
        frozen.thaw()
        taken_back = 0

        async def sample() -> None:
            nonlocal taken_back
            while True:
                taken_back = max(taken_back, await owned_by_frozen())
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        try:
            await wait_finished(redis, order_ids, cluster)
        finally:
            sampler.cancel()
        found = await audit(redis, order_ids)
        figures.record("resumed_worker", {
            "orders": count,
            "statuses_at_freeze": at_freeze,
            "unfinished_at_thaw": unfinished_at_thaw,
            "entries_taken_back_by_resumed_worker": taken_back,
            "duplicate_sends": found.duplicate_sends,
            "executed_twice": len(found.executed_twice),
        })
        assert found.executed_twice == [] and found.lost == 0 and found.bad_history == []
        assert taken_back == 0


# -- 3. kill -9 Redis under load, restart it on the same port and data ------------------------


def test_redis_killed_under_load_and_restarted_loses_no_accepted_order(
    cluster: Cluster, figures: Figures
) -> None:
    run(_redis_crash(cluster, figures))


class Load:
    """Clients posting orders (each with its own Idempotency-Key) until told to stop."""

    def __init__(self, http: AsyncHTTPClient, base_url: str, clients: int) -> None:
        self.http = http
        self.base_url = base_url
        self.clients = clients
        self.rng = random.Random(3)
        self.codes: collections.Counter[int] = collections.Counter()
        self.accepted: dict[str, str] = {}  # idempotency key -> order id
        self.refused: dict[str, dict[str, Any]] = {}  # key -> order, answered 503
        # key -> order, answered 504: sent to Redis, which died before it answered
        self.unknown: dict[str, dict[str, Any]] = {}
        self.bad_answers: list[Any] = []  # 503/504 not the JSON error, other 5xx
        self.stop = asyncio.Event()
        self.on_accept: list[Any] = []

    async def client(self) -> None:
        while not self.stop.is_set():
            key, order = str(uuid.uuid4()), random_order(self.rng)
            answer = await post_order(self.http, self.base_url, order, {"Idempotency-Key": key})
            self.codes[answer.code] += 1
            if answer.code == 202:
                self.accepted[key] = answer.body["order_id"]
                for callback in self.on_accept:
                    callback(answer.body["order_id"])
            elif answer.code == 503:
                self.refused[key] = order
                if not (
                    answer.content_type.startswith("application/json")
                    and isinstance(answer.body, dict)
                    and answer.body.get("error") == "unavailable"
                ):
                    self.bad_answers.append(answer.body)
                # A real client backs off; so does this one, a little.
                await asyncio.sleep(0.05)
            elif answer.code == 504:
                # The outcome is unknown: retried with the same key once Redis is back.
                self.unknown[key] = order
                if not (
                    isinstance(answer.body, dict)
                    and answer.body.get("error") == "outcome_unknown"
                    and answer.body.get("order_id")
                    and "Retry-After" not in answer.headers
                ):
                    self.bad_answers.append(answer.body)
                await asyncio.sleep(0.05)
            else:
                self.bad_answers.append((answer.code, answer.body))

    def start(self) -> asyncio.Future[list[None]]:
        return asyncio.gather(*(self.client() for _ in range(self.clients)))


# The outage lasts until this many POSTs were refused (about 1 s per 150 here).
REFUSED_IN_OUTAGE = scaled(150, 1500)


async def _redis_crash(cluster: Cluster, figures: Figures) -> None:
    before_kill, after_restart = scaled(150, 1000), scaled(150, 1000)
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        worker = cluster.start_worker(CONFIRM_LATENCY_MIN_MS="200", CONFIRM_LATENCY_MAX_MS="800")
        await cluster.wait_worker_ready(worker, redis)
        load = Load(http, web.base_url, clients=8)
        watchers: list[asyncio.Task[Watch]] = []

        def watch_some(order_id: str) -> None:
            if len(load.accepted) % 3 == 0:  # a subscriber for every third order
                watchers.append(asyncio.ensure_future(
                    watch(order_id, [web.ws_url], timeout=FINISH_TIMEOUT_SECS)
                ))

        load.on_accept.append(watch_some)
        running = load.start()
        await eventually(lambda: len(load.accepted) >= before_kill, timeout=60,
                         message="orders before the crash")

        unfinished = await count_unfinished(redis, list(load.accepted.values()))
        cluster.kill_redis()
        killed_at = time.monotonic()
        accepted_at_kill = len(load.accepted)
        # A subscriber arriving now gets a clean close (1013, "try again later"), or
        # waits; either way it follows its order to the end once Redis is back.
        last_order = list(load.accepted.values())[-1]
        arriving = asyncio.ensure_future(watch(last_order, [web.ws_url], timeout=FINISH_TIMEOUT_SECS))
        await eventually(lambda: load.codes[503] >= REFUSED_IN_OUTAGE, timeout=30,
                         message="503s in the outage")
        cluster.restart_redis()
        outage_secs = time.monotonic() - killed_at
        refused_in_outage = load.codes[503]

        await eventually(lambda: len(load.accepted) >= accepted_at_kill + after_restart,
                         timeout=60, message="orders accepted after the restart")
        load.stop.set()
        await running
        # A 503 means nothing was created (invariant 6): Redis has no trace of its key.
        created_behind_503 = [key for key in load.refused
                              if await redis.exists(keys.idempotency(TEST_KEY_ID, key))]
        # The clients that got a 503 or a 504 try again with the same key: each gets
        # its order, created now or (a 504 whose create ran before Redis died)
        # replayed.
        replayed = 0
        for key, order in [*load.refused.items(), *load.unknown.items()]:
            answer = await post_order(http, web.base_url, order, {"Idempotency-Key": key})
            assert answer.code == 202, answer
            load.accepted[key] = answer.body["order_id"]
            replayed += answer.headers.get("Idempotent-Replayed") == "true"
        order_ids = list(load.accepted.values())
        await wait_finished(redis, order_ids, cluster)
        seen = await asyncio.gather(*watchers)
        during = await arriving
        found = await audit(redis, order_ids)
        ready = await http.fetch(f"{web.base_url}/readyz", raise_error=False)

        other_5xx = sum(n for code, n in load.codes.items() if code >= 500 and code not in (503, 504))
        figures.record("redis_kill", {
            "posts": sum(load.codes.values()),
            "answers": {str(k): v for k, v in sorted(load.codes.items())},
            "accepted_before_kill": accepted_at_kill,
            "orders_unfinished_at_kill": unfinished,
            "refused_503_during_outage": refused_in_outage,
            "other_5xx": other_5xx,
            "no_answer": load.codes[599],
            "outage_secs": round(outage_secs, 1),
            "retried_after_503": len(load.refused),
            "created_behind_a_503": len(created_behind_503),
            "outcome_unknown_504": len(load.unknown),
            "replayed_on_retry": replayed,
            "subscriber_arriving_in_outage": {
                "close_codes": dict(collections.Counter(str(c) for c in during.close_codes)),
                "errors": dict(collections.Counter(e["error"] for e in during.errors)),
                "complete": during.complete(),
            },
            "subscriber_close_codes": dict(collections.Counter(
                str(c) for w in seen for c in w.close_codes)),
            "subscribers": len(seen),
            "subscribers_complete": sum(w.complete() for w in seen),
            "subscriber_reconnects": sum(w.connections - 1 for w in seen),
            "faults_injected": 1,
            "web_restarted": False,
            "worker_restarted": False,
            **found.figures(),
        })
        assert load.bad_answers == [] and other_5xx == 0 and load.codes[599] == 0
        assert created_behind_503 == []
        assert refused_in_outage >= REFUSED_IN_OUTAGE
        assert_clean(found, cluster)
        for w in [*seen, during]:
            # Clean closes only: 1013 in the outage, 1000 at the end; never a hang-up.
            assert w.complete() and not w.out_of_order, w
            assert set(w.close_codes) <= {1000, 1013}, w
        # Both recovered by themselves: the same processes, serving again.
        assert web.alive() and worker.alive()
        assert ready.code == 200


# -- 4. kill -9 a web process with subscribers; they reconnect to another ---------------------


def test_subscribers_of_a_killed_web_process_reconnect_elsewhere_and_see_the_rest_once(
    cluster: Cluster, figures: Figures
) -> None:
    run(_killed_web(cluster, figures, scaled(150, 600)))


async def _killed_web(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        doomed = await start_web(cluster, http)
        survivor = await start_web(cluster, http)
        order_ids = await post_orders(http, survivor.base_url, count)
        # Every client starts on the web process that will die, then tries the other.
        watchers = await start_watchers(order_ids, [doomed.ws_url, survivor.ws_url])
        cluster.start_worker(CONFIRM_LATENCY_MIN_MS="1500", CONFIRM_LATENCY_MAX_MS="3000",
                             **MANY_IN_FLIGHT)

        async def under_way() -> bool:
            # Some statuses delivered live by the doomed process, most still to come.
            return await unsettled_sends(redis) >= count // 3

        await eventually(under_way, timeout=60, interval=0.02, message="orders under way")
        subscribers = (await gauges(http, doomed))["status_subscribers"]
        doomed.kill()
        unfinished = await count_unfinished(redis, order_ids)
        seen = await asyncio.gather(*watchers)
        await wait_finished(redis, order_ids, cluster)
        found = await audit(redis, order_ids)

        incomplete = [w for w in seen if not w.complete()]
        figures.record("web_kill", {
            "orders": count,
            "subscribers_on_killed_process": int(subscribers),
            "orders_unfinished_at_kill": unfinished,
            "faults_injected": 1,
            "clients_reconnected": sum(w.connections > 1 for w in seen),
            "replayed_and_dropped_by_client": sum(w.replayed for w in seen),
            "statuses_received": sum(len(w.messages) for w in seen),
            "incomplete": len(incomplete),
            "out_of_order": sum(w.out_of_order for w in seen),
            "gaps": sum(w.gaps for w in seen),
            **found.figures(),
        })
        assert subscribers == count
        assert unfinished > 0, "the kill came too late to test anything"
        assert incomplete == [], incomplete[:3]
        assert all(w.out_of_order == 0 and w.gaps == 0 for w in seen)
        assert all(w.close_codes[-1] == 1000 for w in seen)
        assert_clean(found, cluster)


# -- 5. clients that stop reading -----------------------------------------------------------


def test_clients_that_stop_reading_hold_up_no_one_and_are_closed(
    cluster: Cluster, figures: Figures
) -> None:
    run(_non_readers(cluster, figures, scaled(200, 1000)))


async def _non_readers(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        # A silent client (no order id) is closed after this long.
        web = await start_web(cluster, http, WS_FIRST_MESSAGE_TIMEOUT_SECS="2")
        order_ids = await post_orders(http, web.base_url, count)
        rss_before = web.rss_kib()
        # Each stalled client subscribes, then never reads a byte; its receive buffer
        # is made as small as the kernel allows so the server's writes back up.
        stalled = []
        for start in range(0, len(order_ids), SUBSCRIBE_BATCH):
            for order_id in order_ids[start : start + SUBSCRIBE_BATCH]:
                raw = await RawWebSocket.connect(web.ws_url, rcvbuf=1024)
                await raw.send_text(order_id)
                stalled.append(raw)
            await eventually(lambda: _gauge_is(http, web, "status_subscribers", len(stalled)),
                             timeout=30, message="stalled clients subscribed")
        silent = [await RawWebSocket.connect(web.ws_url, rcvbuf=1024) for _ in range(count // 4)]
        open_with_stalled = (await gauges(http, web))["websockets_open"]
        # Readers of the same orders, on the same process, subscribed before any status
        # beyond "pending" exists: they must get everything, live.
        readers = await start_watchers(order_ids, [web.ws_url], reconnect=False)
        cluster.start_worker(CONFIRM_LATENCY_MIN_MS="200", CONFIRM_LATENCY_MAX_MS="800")
        seen = await asyncio.gather(*readers)
        rss_peak = web.rss_kib()
        sockets = len(stalled) + len(silent) + len(seen)
        await wait_finished(redis, order_ids, cluster)

        # Finished orders: the server sent its close frame to the stalled clients and,
        # with no answer, drops them (Tornado waits 5 s for the closing handshake).
        async def all_closed() -> bool:
            values = await gauges(http, web)
            return values["websockets_open"] == 0 and values["status_subscribers"] == 0

        await eventually(all_closed, timeout=60, interval=0.2,
                         message="stalled sockets closed by the server")
        rss_after = web.rss_kib()
        # What a stalled client finds when it reads at last: its statuses, a close
        # frame, then the end of the connection.
        closes: collections.Counter[int | None] = collections.Counter()
        delivered = 0
        for raw in stalled:
            result = await raw.read_until_closed(timeout=10)
            delivered += len(result.texts)
            closes[result.code] += 1
            await raw.aclose()
        silent_closes: collections.Counter[int | None] = collections.Counter()
        for raw in silent:
            result = await raw.read_until_closed(timeout=10)
            silent_closes[result.code] += 1
            await raw.aclose()

        figures.record("slow_clients", {
            "stalled_clients": len(stalled),
            "silent_clients": len(silent),
            "sockets_open_with_stalled": int(open_with_stalled),
            "readers": len(seen),
            "readers_complete": sum(w.complete() for w in seen),
            "stalled_close_codes": {str(k): v for k, v in closes.items()},
            "silent_close_codes": {str(k): v for k, v in silent_closes.items()},
            "statuses_buffered_for_stalled": delivered,
            "rss_kib_before": rss_before,
            "rss_kib_peak": rss_peak,
            "rss_kib_after": rss_after,
            "rss_kib_per_socket": round((rss_peak - rss_before) / sockets, 1),
        })
        assert all(w.complete() for w in seen), [w for w in seen if not w.complete()][:3]
        assert closes == {1000: len(stalled)}
        assert silent_closes == {4408: len(silent)}
        # Bounded per socket (a generous bound: about 18 KiB is measured). CPython keeps
        # the memory for reuse once the sockets are gone; test 6 shows it is reused.
        assert (rss_peak - rss_before) / sockets < 100


@pytest.mark.skipif(not SOAK, reason="soak only (SOAK=1): waits out the 20 s + 20 s ping timeout")
def test_a_stalled_client_of_an_order_that_never_ends_is_dropped_by_the_ping_timeout(
    cluster: Cluster, figures: Figures
) -> None:
    run(_stalled_forever(cluster, figures))


async def _stalled_forever(cluster: Cluster, figures: Figures) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        # No worker: the orders stay pending, so only the keep-alive can end these.
        order_ids = await post_orders(http, web.base_url, 50)
        stalled = []
        for order_id in order_ids:
            raw = await RawWebSocket.connect(web.ws_url, rcvbuf=1024)
            await raw.send_text(order_id)
            stalled.append(raw)
        await eventually(
            lambda: _gauge_is(http, web, "status_subscribers", len(order_ids)),
            message="subscribed",
        )
        started = time.monotonic()

        await eventually(
            lambda: _gauge_is(http, web, "websockets_open", 0),
            timeout=90, interval=1.0, message="stalled sockets dropped",
        )
        dropped_after = time.monotonic() - started
        subscribers = (await gauges(http, web))["status_subscribers"]
        for raw in stalled:
            await raw.aclose()
        figures.record("stalled_forever", {
            "stalled_clients": len(stalled),
            "dropped_after_secs": round(dropped_after),
            "subscribers_left": int(subscribers),
        })
        assert subscribers == 0


async def _gauge_is(http: AsyncHTTPClient, web: WebProcess, name: str, value: float) -> bool:
    return (await gauges(http, web))[name] == value


# -- 6. thousands of WebSocket connect/close cycles ------------------------------------------


def test_websocket_connect_close_cycles_leave_no_subscriber_and_no_growth(
    cluster: Cluster, figures: Figures
) -> None:
    run(_cycles(cluster, figures, scaled(2000, 5000)))


async def _cycles(cluster: Cluster, figures: Figures, cycles: int) -> None:
    from tornado.websocket import websocket_connect

    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http, WS_FIRST_MESSAGE_TIMEOUT_SECS="2")
        # No worker: "live" orders stay pending; "finished" ones are cancelled.
        live = await post_orders(http, web.base_url, 20)
        finished = await post_orders(http, web.base_url, 20, seed=2)
        for order_id in finished:
            response = await http.fetch(f"{web.base_url}/api/orders/{order_id}", method="DELETE",
                                        headers=AUTH_HEADERS)
            assert response.code == 200
        kinds: collections.Counter[str] = collections.Counter()
        unexpected: list[Any] = []

        async def cycle(i: int) -> None:
            kind = ("live", "finished", "bad_id", "unknown", "silent_close", "abort")[i % 6]
            kinds[kind] += 1
            if kind == "abort":
                # Subscribes, then the TCP connection drops without a close frame.
                raw = await RawWebSocket.connect(web.ws_url)
                await raw.send_text(live[i % len(live)])
                await raw.read_frame()
                raw.writer.transport.abort()
                return
            ws = await websocket_connect(web.ws_url)
            try:
                if kind == "silent_close":
                    return
                first = {
                    "live": live[i % len(live)],
                    "finished": finished[i % len(finished)],
                    "bad_id": "not an order id",
                    "unknown": str(uuid.uuid4()),
                }[kind]
                await ws.write_message(first)
                if kind == "live":
                    message = json.loads(await ws.read_message())  # type: ignore[arg-type]
                    if message.get("status") != "pending":
                        unexpected.append(message)
                    return
                while await ws.read_message() is not None:
                    pass
                expected = {"finished": 1000, "bad_id": 4400, "unknown": 4404}[kind]
                if ws.close_code != expected:
                    unexpected.append((kind, ws.close_code))
            finally:
                ws.close()

        async def cycles_of(total: int, offset: int = 0, concurrency: int = 20) -> None:
            queue = collections.deque(range(offset, offset + total))

            async def client() -> None:
                while queue:
                    await cycle(queue.popleft())

            await asyncio.gather(*(client() for _ in range(concurrency)))

        async def idle() -> bool:
            values = await gauges(http, web)
            return values["websockets_open"] == 0 and values["status_subscribers"] == 0

        warm_up = 300
        await cycles_of(warm_up)
        await eventually(idle, timeout=30, interval=0.1, message="warm-up sockets closed")
        kinds.clear()
        rss_before = web.rss_kib()
        await cycles_of(cycles, offset=warm_up)
        await eventually(idle, timeout=30, interval=0.1, message="every socket closed")
        rss_after = web.rss_kib()
        figures.record("ws_cycles", {
            "cycles": cycles,
            "warm_up_cycles": warm_up,
            "kinds": dict(kinds),
            "unexpected": len(unexpected),
            "subscribers_left": 0,
            "sockets_left": 0,
            "rss_kib_before": rss_before,
            "rss_kib_after": rss_after,
            "rss_growth_kib": rss_after - rss_before,
        })
        assert unexpected == [], unexpected[:5]
        assert rss_after - rss_before < 20 * 1024


# -- 7. two web processes, three workers ----------------------------------------------------


def test_two_web_processes_and_three_workers_execute_each_order_once_for_every_subscriber(
    cluster: Cluster, figures: Figures
) -> None:
    run(_scaled_out(cluster, figures, scaled(300, 1000)))


async def _scaled_out(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        webs = [await start_web(cluster, http), await start_web(cluster, http)]
        latency = {"CONFIRM_LATENCY_MIN_MS": "100", "CONFIRM_LATENCY_MAX_MS": "600"}
        workers = [cluster.start_worker(**latency) for _ in range(3)]
        for worker in workers:
            await cluster.wait_worker_ready(worker, redis)
        rng = random.Random(7)
        order_ids: list[str] = []
        watchers: list[asyncio.Task[Watch]] = []
        where: collections.Counter[str] = collections.Counter()

        async def submit(i: int) -> None:
            web = webs[i % 2]
            answer = await post_order(http, web.base_url, random_order(rng))
            assert answer.code == 202, answer
            order_id = answer.body["order_id"]
            order_ids.append(order_id)
            # Subscribe at once, on the other process (every fifth order on both).
            targets = [webs[(i + 1) % 2]] + ([web] if i % 5 == 0 else [])
            for target in targets:
                where[target.name] += 1
                watchers.append(asyncio.ensure_future(
                    watch(order_id, [target.ws_url], reconnect=False, timeout=FINISH_TIMEOUT_SECS)
                ))

        queue = collections.deque(range(count))

        async def client() -> None:
            while queue:
                await submit(queue.popleft())

        await asyncio.gather(*(client() for _ in range(10)))
        seen = await asyncio.gather(*watchers)
        await wait_finished(redis, order_ids, cluster)
        found = await audit(redis, order_ids)
        per_worker = {
            w.name: w.log_text().count("-> submitted") for w in workers
        }
        for worker in workers:
            assert worker.terminate() == 0, worker.output()

        incomplete = [w for w in seen if not w.complete()]
        figures.record("scale_out", {
            "orders": count,
            "web_processes": 2,
            "workers": 3,
            "subscribers": len(seen),
            "subscribers_per_web": dict(where),
            "subscribers_complete": len(seen) - len(incomplete),
            "orders_sent_per_worker": per_worker,
            **found.figures(),
        })
        assert incomplete == [], incomplete[:3]
        assert all(w.close_codes == [1000] for w in seen)
        assert_clean(found, cluster)
        assert found.orders == count


# -- a healthy Redis is never taken for a down one -------------------------------------------
# Found by these tests and, at the same time, by the benchmark: redis-py's default
# pool of 100 connections refused the 101st concurrent command ("Too many
# connections", a ConnectionError), which the service took for an outage (POST 503,
# WebSocket 1013, worker retries). Fixed in engine/core/connections.py (a blocking pool).


def test_a_burst_of_concurrent_requests_on_a_healthy_redis_is_not_refused(
    cluster: Cluster, figures: Figures
) -> None:
    run(_burst(cluster, figures, posts=400, subscribers=300))


async def _burst(cluster: Cluster, figures: Figures, posts: int, subscribers: int) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        rng = random.Random(5)
        burst = http_client(max_clients=posts)
        try:
            answers = await asyncio.gather(
                *(post_order(burst, web.base_url, random_order(rng)) for _ in range(posts))
            )
        finally:
            burst.close()
        codes = collections.Counter(a.code for a in answers)
        order_id = next(a.body["order_id"] for a in answers if a.code == 202)
        firsts = await asyncio.gather(*(first_message(web, order_id) for _ in range(subscribers)))
        closes = collections.Counter(
            "pending" if m.get("status") == "pending" else m.get("error") for m in firsts
        )
        figures.record("burst", {
            "concurrent_posts": posts,
            "answers": {str(k): v for k, v in codes.items()},
            "concurrent_subscribers": subscribers,
            "first_messages": dict(closes),
            "too_many_connections_logged": web.log_text().count("Too many connections"),
        })
        assert codes == {202: posts}
        assert closes == {"pending": subscribers}


async def first_message(web: WebProcess, order_id: str) -> dict[str, Any]:
    """Subscribe and return the first message (a status, or the error before a close)."""
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(web.ws_url)
    try:
        await ws.write_message(order_id)
        raw = await asyncio.wait_for(ws.read_message(), 30)
        return json.loads(raw) if raw else {"error": f"closed {ws.close_code}"}
    finally:
        ws.close()


def test_a_worker_with_hundreds_in_flight_never_takes_a_healthy_redis_for_down(
    cluster: Cluster, figures: Figures
) -> None:
    run(_busy_worker(cluster, figures, 300))


async def _busy_worker(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        order_ids = await post_orders(http, web.base_url, count)
        worker = cluster.start_worker(WORKER_CONCURRENCY=str(count))
        await wait_finished(redis, order_ids, cluster)
        log = worker.log_text()
        figures.record("busy_worker", {
            "orders": count,
            "worker_concurrency": count,
            "redis_unavailable_warnings": log.count("Redis unavailable"),
            "heartbeat_failures": log.count("heartbeat failed"),
        })
        assert "Redis unavailable" not in log and "heartbeat failed" not in log


# Found by this test: past MAX_DELIVERIES (here after one worker crash, with
# MAX_DELIVERIES=1) an order whose transaction was out was dead-lettered and left
# "submitted" for ever, though the venue could tell its outcome. Fixed in 889e08a.
def test_an_order_whose_transaction_is_out_still_finishes_after_too_many_deliveries(
    cluster: Cluster, figures: Figures
) -> None:
    run(_give_up_after_sending(cluster, figures, 50))


async def _give_up_after_sending(cluster: Cluster, figures: Figures, count: int) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        order_ids = await post_orders(http, web.base_url, count)
        # MAX_DELIVERIES=1: the first takeover is already one delivery too many. With
        # the default 5 it takes five crashes (a worker in a crash loop) to get here.
        settings = {**SLOW_CONFIRMS, "MAX_DELIVERIES": "1"}
        first = cluster.start_worker(**settings)

        async def all_sent() -> bool:
            return await unsettled_sends(redis) == count

        await eventually(all_sent, timeout=60, interval=0.02, message="every order sent")
        first.kill()
        cluster.start_worker(**settings)

        async def queue_done() -> bool:
            # Every entry acknowledged: executed, or dead-lettered.
            return await group_pending(redis) == 0 and await redis.xlen(keys.ORDERS_STREAM) == 0

        await eventually(queue_done, timeout=60, interval=0.1, message="queue drained")
        found = await audit(redis, order_ids)
        figures.record("too_many_deliveries", {
            "orders": count,
            "sent_when_worker_killed": count,
            "dead_letters": found.dead_letters,
            "left_unfinished": len(found.unfinished),
            "statuses": await status_breakdown(redis, order_ids),
        })
        assert found.unfinished == [] and found.ledger_mismatch == []
