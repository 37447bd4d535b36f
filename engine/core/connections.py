"""Redis clients, configured so that an unreachable Redis fails fast instead of hanging."""

from __future__ import annotations

import asyncio
import re

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.core.config import Config
from engine.core.pipelined import PipelinedRedis

# Connections per client. A burst of requests waits for a free connection (up to the
# Redis timeout) instead of failing: redis-py's default pool refuses the 101st
# concurrent command with "Too many connections", which would surface as a 503.
MAX_CONNECTIONS = 64

# Errors that mean "Redis is not there right now": answered with 503 on the request
# path, retried with a delay by the background loops.
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# Error replies by which Redis refuses a command it cannot run now, before it wrote
# anything (every store script reads before its first write, and Redis refuses that
# first write): out of memory, a failed disk (MISCONF), a read-only replica, too few
# replicas, a master down, a script busy, a cluster resharding or down.
UNAVAILABLE_REPLIES = ("OOM", "MISCONF", "READONLY", "NOREPLICAS", "MASTERDOWN", "BUSY",
                       "TRYAGAIN", "CLUSTERDOWN")


# The code starts the reply; inside a script, Redis 6.2 puts it after "... -" (7+
# keeps it first).
_REFUSED_REPLY = re.compile(r"(?:^|: -)(" + "|".join(UNAVAILABLE_REPLIES) + r")\b")


def refused_for_now(exc: BaseException) -> bool:
    """Whether ``exc`` is an error reply of UNAVAILABLE_REPLIES (Redis did nothing,
    and may do it later: a 503 on the request path)."""
    return isinstance(exc, ResponseError) and _REFUSED_REPLY.search(str(exc)) is not None


# The worker's pool: its commands in flight are bounded by WORKER_CONCURRENCY (an order
# runs at most a couple at once: quotes go to the venues concurrently), so a pool of
# this size never makes an order wait, up to a cap that Redis's connection limit
# (10,000 by default, shared by every process) can afford.
WORKER_MAX_CONNECTIONS = 512


def worker_pool_size(config: Config) -> int:
    return min(2 * config.worker_concurrency + 8, WORKER_MAX_CONNECTIONS)


def connect(
    url: str,
    config: Config,
    *,
    block_ms: int = 0,
    max_connections: int = MAX_CONNECTIONS,
    wait_for_connection: bool = False,
) -> Redis:
    """A client for ``url``.

    ``block_ms`` is the longest blocking read (XREAD/XREADGROUP BLOCK) this client
    makes; its socket timeout is set above it so a block is not mistaken for a dead
    connection. redis-py 8's default socket timeout is 5 s, too long for the request
    path and too short for nothing else, so every timeout here is explicit.

    A command waits up to ``REDIS_TIMEOUT_SECS`` for a free connection, then fails
    like an unreachable Redis (a 503 on the request path). With
    ``wait_for_connection`` it waits as long as it takes: for the worker, where a
    busy event loop can be slow to hand connections back and failing the wait would
    only cost the order a retry. Every connection in use is itself bounded by the
    socket timeouts, so the wait cannot last for ever.
    """
    socket_timeout = config.redis_timeout_secs + block_ms / 1000
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None if wait_for_connection else config.redis_timeout_secs,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(config.redis_timeout_secs, 1.0),
        # One quick retry rides over a dropped idle connection; more would only
        # delay the 503. Re-sent scripts are idempotent (see engine.core.store).
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        health_check_interval=30,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


def connect_pipelined(url: str, config: Config) -> PipelinedRedis | None:
    """A pipelined connection for the order store's scripts (engine.core.pipelined), with
    the same bounds as ``connect``'s clients; None where it does not apply (TLS)."""
    return PipelinedRedis.for_url(
        url,
        connect_timeout=min(config.redis_timeout_secs, 1.0),
        stall_secs=config.redis_timeout_secs,
    )


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
