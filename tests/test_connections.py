"""Redis clients (engine.core.connections), against a real Redis: a full pool either waits
a bounded time for a connection (web: then a 503) or as long as it takes (worker)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from engine.core.config import Config
from engine.core.connections import WORKER_MAX_CONNECTIONS, connect, worker_pool_size

HOLD_MS = 400  # one command holds the only connection this long (XREAD BLOCK)


async def _second_command_while_the_first_holds_the_pool(
    config: Config, wait_for_connection: bool
) -> None:
    quick = dataclasses.replace(config, redis_timeout_secs=0.1)
    client = connect(
        quick.redis_url or "", quick, block_ms=HOLD_MS, max_connections=1,
        wait_for_connection=wait_for_connection,
    )
    try:
        holder = asyncio.ensure_future(
            client.xread({"no-such-stream": "$"}, block=HOLD_MS)
        )
        await asyncio.sleep(0.05)  # the XREAD has the connection now
        try:
            assert await client.ping() is True
        finally:
            assert not await holder  # the block ran out: nothing to read
    finally:
        await client.aclose()


async def test_a_web_client_gives_up_waiting_for_a_connection_after_the_timeout(
    config: Config,
) -> None:
    with pytest.raises(RedisConnectionError, match="No connection available"):
        await _second_command_while_the_first_holds_the_pool(config, wait_for_connection=False)


async def test_a_worker_client_waits_for_a_connection_however_long(config: Config) -> None:
    # The command after the 400 ms hold succeeds, though the Redis timeout is 100 ms:
    # a slow hand-back of a connection is not taken for a dead Redis.
    await _second_command_while_the_first_holds_the_pool(config, wait_for_connection=True)


def test_the_worker_pool_covers_its_orders_in_flight_up_to_a_cap() -> None:
    assert worker_pool_size(Config(worker_concurrency=64)) == 136
    assert worker_pool_size(Config(worker_concurrency=5000)) == WORKER_MAX_CONNECTIONS
