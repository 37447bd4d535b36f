"""Prometheus metrics for ``GET /metrics``.

The web process's own figures (requests, submit latency, open sockets) are kept in a
registry the app owns. The system's figures (orders by status, retries, dead letters,
the queue, workers' in-flight orders) live in Redis, written by whichever process
did the work, and are read at scrape time, so any web process reports the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from engine.core import keys
from engine.core.store import STATUSES, OrderStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Submit latency buckets: the target is a p99 of 10 ms, so resolve well below it.
SUBMIT_BUCKETS_SECS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)


class _Snapshot(Collector):
    """Serves the figures last read from Redis (``Metrics.refresh``)."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.queue_length = 0
        self.pending_entries = 0
        self.workers: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        orders = CounterMetricFamily(
            "orders", "Orders that reached each status (all web and worker processes)",
            labels=["status"],
        )
        for status in STATUSES:
            orders.add_metric([status], self.counters.get(status, 0))
        yield orders
        yield CounterMetricFamily(
            "order_retries", "Order attempts retried after a transient venue error",
            value=self.counters.get("retries", 0),
        )
        yield CounterMetricFamily(
            "dead_letters", "Queue entries set aside after too many deliveries",
            value=self.counters.get("dead_letters", 0),
        )
        yield GaugeMetricFamily(
            "orders_queue_length", "Entries in the orders stream not yet finished",
            value=self.queue_length,
        )
        yield GaugeMetricFamily(
            "orders_pending_entries", "Entries delivered to a worker and not yet acknowledged",
            value=self.pending_entries,
        )
        # Finished entries are deleted with their acknowledgement, so the stream holds
        # exactly the waiting entries plus the pending ones.
        yield GaugeMetricFamily(
            "orders_stream_lag", "Entries in the orders stream that no worker has taken yet",
            value=max(0, self.queue_length - self.pending_entries),
        )
        in_flight = GaugeMetricFamily(
            "worker_in_flight", "Orders each live worker is executing", labels=["worker"]
        )
        for name, count in sorted(self.workers.items()):
            in_flight.add_metric([name], count)
        yield in_flight


class Metrics:
    """This web process's metrics registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests", "HTTP requests answered", ["handler", "method", "code"],
            registry=self.registry,
        )
        self.submit_seconds = Histogram(
            "order_submit_seconds", "Time to answer POST /api/orders/execute",
            buckets=SUBMIT_BUCKETS_SECS, registry=self.registry,
        )
        self.websockets = Gauge(
            "websockets_open", "Status WebSockets open on this process", registry=self.registry
        )
        self.subscribers = Gauge(
            "status_subscribers", "Subscriptions fed by this process's poller",
            registry=self.registry,
        )
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)

    def observe_request(self, handler: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(handler, method, str(code)).inc()
        if handler == "ExecuteOrderHandler" and method == "POST":
            self.submit_seconds.observe(seconds)

    async def refresh(self, redis: Redis, store: OrderStore) -> None:
        """Read the system-wide figures from Redis (one pipeline, then the workers)."""
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.COUNTERS)
            pipe.xlen(keys.ORDERS_STREAM)
            pipe.xinfo_groups(keys.ORDERS_STREAM)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        counters, length, groups = replies
        snap = self._snapshot
        snap.counters = {k: int(v) for k, v in (counters or {}).items()} if isinstance(counters, dict) else {}
        snap.queue_length = length if isinstance(length, int) else 0
        snap.pending_entries = sum(
            int(g.get("pending", 0)) for g in (groups if isinstance(groups, list) else [])
        )
        workers: dict[str, int] = {}
        async for key in redis.scan_iter(match=f"{keys.WORKER_PREFIX}*", count=100):
            raw = cast(str | None, await redis.get(key))
            if raw:
                workers[key.removeprefix(keys.WORKER_PREFIX)] = int(json.loads(raw)["in_flight"])
        snap.workers = workers

    def render(self) -> bytes:
        return generate_latest(self.registry)
