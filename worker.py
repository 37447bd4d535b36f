"""Worker entry point (Procfile ``worker``): executes orders from the Redis stream.

Needs ``REDIS_URL``: embedded mode is the web process's job (``server.py`` starts a
local Redis and runs this file as its child with ``REDIS_URL`` set). Runs until
SIGTERM or SIGINT, then finishes the orders in flight within SHUTDOWN_GRACE_SECS and
exits 0; a second signal stops at once (unfinished orders stay pending and are
resumed by another worker or the next start).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Mapping

from engine.core.config import Config, ConfigError
from engine.core.connections import connect, connect_pipelined, worker_pool_size
from engine.core.store import OrderStore
from engine.execution.consumer import READ_BLOCK_MS
from engine.execution.services import build_worker, prepare_venues
from engine.execution.venues.base import TransientVenueError, Venue
from engine.execution.venues.evm_chain import EvmSetupError
from engine.ops import runtime
from engine.ops.logs import setup_logging

logger = logging.getLogger("worker")

# How long a starting worker waits for its venues (an EVM node) to answer.
PREPARE_TIMEOUT_SECS = 60.0


async def work(config: Config, redis_url: str) -> None:
    """Run one worker until a signal, then shut it down gracefully."""
    redis = connect(
        redis_url,
        config,
        block_ms=READ_BLOCK_MS,
        max_connections=worker_pool_size(config),
        wait_for_connection=True,
    )
    # The store's scripts (the order's transitions) go over one pipelined connection.
    pipe = connect_pipelined(redis_url, config)
    consumer = build_worker(redis, config, store=OrderStore(redis, config, pipe))
    await _prepare(consumer.driver.venues)
    runner = asyncio.create_task(consumer.run(), name="consumer")
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.info("%s received; finishing orders in flight", signal.Signals(signum).name)
            consumer.stop()
        else:
            logger.warning("second signal; stopping now")
            runner.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    runtime.settle_heap()  # after the handlers: a SIGTERM meanwhile still drains
    try:
        await runner
    except asyncio.CancelledError:
        if signals < 2:
            raise
    finally:
        await redis.aclose()
        if pipe is not None:
            await pipe.aclose()


async def _prepare(venues: Mapping[str, Venue]) -> None:
    """Get the venues ready, waiting out a node that does not answer yet (EvmSetupError
    stops the worker: the configuration is wrong)."""
    deadline = time.monotonic() + PREPARE_TIMEOUT_SECS
    while True:
        try:
            await prepare_venues(venues)
            return
        except TransientVenueError as exc:
            if time.monotonic() > deadline:
                raise EvmSetupError(f"the venues did not get ready in {PREPARE_TIMEOUT_SECS:g} s: {exc}") from None
            logger.warning("venues not ready (%s); trying again", exc)
            await asyncio.sleep(2.0)


def main() -> int:
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    if config.redis_url is None:
        print(
            "worker: REDIS_URL is not set. Point it at the Redis the web process uses "
            "(e.g. REDIS_URL=redis://localhost:6379/0); for a local run, start "
            "`python server.py`, which starts Redis and a worker itself.",
            file=sys.stderr,
        )
        return 2
    setup_logging(config, "worker")
    try:
        runtime.run(work(config, config.redis_url))
    except EvmSetupError as exc:
        print(f"worker: cannot trade on the EVM market: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
