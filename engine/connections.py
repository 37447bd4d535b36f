"""Redis clients, configured so that an unreachable Redis fails fast instead of hanging."""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.config import Config

# Connections per client. A burst of requests waits for a free connection (up to the
# Redis timeout) instead of failing: redis-py's default pool refuses the 101st
# concurrent command with "Too many connections", which would surface as a 503.
MAX_CONNECTIONS = 64

# Errors that mean "Redis is not there right now": answered with 503 on the request
# path, retried with a delay by the background loops.
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def connect(url: str, config: Config, *, block_ms: int = 0) -> Redis:
    """A client for ``url``.

    ``block_ms`` is the longest blocking read (XREAD/XREADGROUP BLOCK) this client
    makes; its socket timeout is set above it so a block is not mistaken for a dead
    connection. redis-py 8's default socket timeout is 5 s, too long for the request
    path and too short for nothing else, so every timeout here is explicit.
    """
    socket_timeout = config.redis_timeout_secs + block_ms / 1000
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=config.redis_timeout_secs,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(config.redis_timeout_secs, 1.0),
        # One quick retry rides over a dropped idle connection; more would only
        # delay the 503. Re-sent scripts are idempotent (see engine.store).
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        health_check_interval=30,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


def raise_if_cancelled() -> None:
    """Call first thing in an ``except`` for Redis errors inside a retry loop.

    A cancellation that lands while redis-py reads a reply can surface as one of its
    connection or timeout errors instead of CancelledError; a loop that retries those
    would then swallow its own cancellation and never stop. Python 3.11 counts
    pending cancellations, so the loop can tell.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
