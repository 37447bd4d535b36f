"""GET /metrics: this process's figures and the system's, in Prometheus format."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from engine.core import keys
from engine.core.config import Config
from engine.execution.driver import MAX_ATTEMPTS
from engine.execution.services import build_worker
from engine.web.services import Services
from tests.helpers import VALID_ORDER, eventually, open_socket, post_chunked, post_order


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.fetch("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_requests_orders_sockets_and_workers(
    http_server_client: Any, services: Services, config: Config, redis: Redis
) -> None:
    for _ in range(2):
        response, _ = await post_order(http_server_client)
        assert response.code == 202
    bad, _ = await post_order(http_server_client, {**VALID_ORDER, "amount": -1})
    assert bad.code == 400
    # A chunked body goes to the streaming handler: still counted as this endpoint's.
    chunked = await post_chunked(http_server_client, [json.dumps(VALID_ORDER).encode()])
    assert chunked.code == 202
    ws = await open_socket(http_server_client)

    worker = build_worker(services.redis, config)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: redis.exists(keys.worker(worker.consumer)), message="worker alive")
        await eventually(lambda: _drained(redis, 3), message="orders confirmed")
        samples = await scrape(http_server_client)
    finally:
        worker.stop()
        await task
        ws.close()

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    execute = {"handler": "ExecuteOrderHandler", "method": "POST"}
    assert value("http_requests_total", **execute, code="202") == 3
    assert value("http_requests_total", **execute, code="400") == 1
    assert value("order_submit_seconds_count") == 4
    assert value("websockets_open") == 1
    assert value("orders_total", status="pending") == 3
    assert value("orders_total", status="confirmed") == 3
    assert value("orders_total", status="failed") == 0
    assert value("order_retries_total") == 0
    assert value("dead_letters_total") == 0
    assert value("orders_queue_length") == 0
    assert value("orders_pending_entries") == 0
    assert value("orders_stream_lag") == 0
    assert value("worker_in_flight", worker=worker.consumer) >= 0


async def test_metrics_show_lag_retries_and_dead_letters(
    http_server_client: Any, services: Services, config: Config, redis: Redis
) -> None:
    for _ in range(3):
        response, _ = await post_order(http_server_client)
        assert response.code == 202
    await redis.xadd(keys.ORDERS_STREAM, {"junk": "no order id"})  # a poison entry
    samples = await scrape(http_server_client)
    assert samples[("orders_stream_lag", ())] == 4  # no worker yet
    assert samples[("orders_pending_entries", ())] == 0

    # Every venue call fails: each order is retried, then failed; the poison entry
    # is dead-lettered.
    failing = dataclasses.replace(config, venue_failure_rate=1.0)
    await asyncio.wait_for(
        build_worker(services.redis, failing, retry_backoff_secs=0.0).run(burst=True), 20
    )
    samples = await scrape(http_server_client)
    assert samples[("orders_stream_lag", ())] == 0
    assert samples[("orders_total", (("status", "failed"),))] == 3
    assert samples[("order_retries_total", ())] == 3 * (MAX_ATTEMPTS - 1)
    assert samples[("dead_letters_total", ())] == 1


async def _drained(redis: Redis, orders: int) -> bool:
    counters = await redis.hgetall(keys.COUNTERS)
    return counters.get("confirmed") == str(orders) and await redis.xlen(keys.ORDERS_STREAM) == 0


async def test_metrics_are_served_when_redis_is_down(http_server_client: Any, services: Services) -> None:
    await services.redis.aclose()
    services.redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    samples = await scrape(http_server_client)
    assert ("websockets_open", ()) in samples
