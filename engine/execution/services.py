"""The worker's composition root: the one place that chooses the venues and builds the
driver and the consumer (engine.web.services is the web process's).

The consumer and the driver know venues only through engine.execution.venues.base;
which venues a worker trades on is decided here, from the configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from redis.asyncio import Redis

from engine.core.config import Config
from engine.core.pipelined import HotPath
from engine.core.store import OrderStore
from engine.execution.consumer import Consumer
from engine.execution.driver import RETRY_BACKOFF_SECS, STATUS_POLL_SECS, OrderDriver
from engine.execution.router import QUOTE_TIMEOUT_SECS, Router
from engine.execution.venues.base import Venue
from engine.execution.venues.evm import EvmVenue, make_evm_venues
from engine.execution.venues.evm_chain import EvmChain
from engine.execution.venues.market import SimulatedMarket
from engine.execution.venues.simulated import make_simulated_venues


def venues_for(
    redis: Redis, config: Config, market: SimulatedMarket | None = None, hot: HotPath | None = None
) -> dict[str, Venue]:
    """The venues a worker trades on, by name. MARKET=simulated: the simulated
    market's (with ``market`` given, that market: tests pass one with a manual
    clock), their ledger's commands on ``hot`` (default: redis-py's ``redis``).
    MARKET=evm: a Uniswap V2 router per venue of the chain file, on the node
    (engine.execution.venues.evm); raises EvmSetupError when that cannot be set up."""
    if config.market == "evm":
        return dict(make_evm_venues(EvmChain.from_config(config, redis)))
    return dict(make_simulated_venues(redis, config, market, hot=hot))


async def prepare_venues(venues: Mapping[str, Venue]) -> None:
    """Make ``venues`` ready for their first order. EVM venues: their chain's
    ``EvmChain.start`` (the node serves the chain file's chain; Redis is durable
    enough; the wallet's nonce gaps closed), then approve each router for
    each token (once, ever); raises EvmSetupError or TransientVenueError. Others
    need nothing."""
    started: set[int] = set()
    for venue in venues.values():
        if isinstance(venue, EvmVenue):
            if id(venue.chain) not in started:
                await venue.chain.start()
                started.add(id(venue.chain))
                _watchers.add(asyncio.create_task(venue.chain.watch_health(), name="chain-health"))
            await venue.prepare()


# The chains' health watchers (EvmChain.watch_health), kept from garbage collection;
# they end with the worker's loop.
_watchers: set[asyncio.Task[None]] = set()


def build_worker(
    redis: Redis,
    config: Config,
    *,
    venues: Mapping[str, Venue] | None = None,
    market: SimulatedMarket | None = None,
    store: OrderStore | None = None,
    consumer: str | None = None,
    retry_backoff_secs: float = RETRY_BACKOFF_SECS,
    status_poll_secs: float = STATUS_POLL_SECS,
) -> Consumer:
    """A worker: a Consumer of the orders stream whose OrderDriver trades on
    ``venues`` (default: ``venues_for(redis, config, market)``) and records in
    ``store`` (default: an OrderStore on ``redis``). ``consumer`` is its name in the
    group; the two intervals are for tests."""
    store = store or OrderStore(redis, config)
    chosen = dict(venues) if venues is not None else venues_for(redis, config, market, store.hot)
    # A venue that has not quoted by then is treated as down for this order; a slow
    # simulated market (QUOTE_LATENCY_MS) gets three round trips.
    quote_timeout = max(QUOTE_TIMEOUT_SECS, 3 * config.quote_latency_ms / 1000)
    router = Router(chosen, timeout_secs=quote_timeout)
    driver = OrderDriver(
        store, chosen, router, retry_backoff_secs=retry_backoff_secs, status_poll_secs=status_poll_secs,
        stuck_after_secs=config.tx_stuck_secs,
    )
    return Consumer(redis, config, driver, consumer=consumer)
