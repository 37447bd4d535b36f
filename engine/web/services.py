"""The objects a web process owns, built once at start and handed to the handlers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from redis.asyncio import Redis

from engine.core.accounts import ApiKeys
from engine.core.config import Config
from engine.core.connections import REDIS_DOWN_ERRORS, connect, connect_pipelined, raise_if_cancelled
from engine.core.pipelined import PipelinedRedis
from engine.core.store import PRUNE_EVERY, OrderStore
from engine.web.metrics import Metrics
from engine.web.schemas import Schemas
from engine.web.updates import StatusHub

logger = logging.getLogger(__name__)

# How often a web process measures Redis's clock (engine.core.store.RedisClock, for the
# create script's deadline): clocks drift by parts per million, so once a minute is
# plenty; after a failed or too slow sample, again after a second.
CLOCK_SYNC_SECS = 60.0
CLOCK_RETRY_SECS = 1.0
# How often a web process checks that the API keys its account feeds follow are still
# live: a revoked key's feeds close within this long (HTTP calls check at each call).
FEED_RECHECK_SECS = 1.0


@dataclasses.dataclass
class Services:
    config: Config
    redis: Redis
    poll_redis: Redis
    # Carries the store's scripts (None with TLS: then redis-py does); closed here.
    pipe: PipelinedRedis | None
    store: OrderStore
    hub: StatusHub
    schemas: Schemas
    metrics: Metrics
    api_keys: ApiKeys
    # The open status WebSockets (handlers.status.OrderStatusSocket), so that a
    # shutdown can close them with 1001 rather than drop them.
    open_sockets: set[Any] = dataclasses.field(default_factory=set)
    _clock_task: asyncio.Task[None] | None = None
    _feeds_task: asyncio.Task[None] | None = None
    _creates: int = 0
    _prunes: set[asyncio.Task[int]] = dataclasses.field(default_factory=set)

    @classmethod
    def create(cls, config: Config, redis_url: str, schemas: Schemas | None = None) -> Services:
        """Build the services; nothing connects until first use."""
        redis = connect(redis_url, config)
        poll_redis = connect(redis_url, config, block_ms=config.poll_block_ms)
        pipe = connect_pipelined(redis_url, config)
        store = OrderStore(redis, config, pipe)
        return cls(
            config=config,
            redis=redis,
            poll_redis=poll_redis,
            pipe=pipe,
            store=store,
            hub=StatusHub(poll_redis, store, config),
            schemas=schemas or Schemas(),
            metrics=Metrics(),
            api_keys=ApiKeys(redis, config),
        )

    def start(self) -> None:
        """Start the background tasks: the status poller, and the clock sync."""
        self.hub.start()
        if self._clock_task is None:
            self._clock_task = asyncio.create_task(self._keep_clock(), name="redis-clock")
        if self._feeds_task is None:
            self._feeds_task = asyncio.create_task(self._check_feeds(), name="feed-keys")

    def prune_now_and_then(self, owner: str) -> None:
        """After a create: every PRUNE_EVERY-th one, prune the owner's order list
        (OrderStore.prune_key_orders) in the background, after the answer; a failure
        is only logged (the next prune tries again)."""
        self._creates += 1
        if self._creates % PRUNE_EVERY:
            return
        task = asyncio.ensure_future(self.store.prune_key_orders(owner))
        self._prunes.add(task)
        task.add_done_callback(self._pruned)

    def _pruned(self, task: asyncio.Task[int]) -> None:
        self._prunes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("pruning an order list failed: %s", task.exception())

    async def _check_feeds(self) -> None:
        """Every FEED_RECHECK_SECS: close the account feeds of keys revoked since."""
        failing = False
        while True:
            await asyncio.sleep(FEED_RECHECK_SECS)
            owners = self.hub.followed_owners
            if not owners or not self.config.auth:
                continue
            try:
                live = await self.api_keys.live_ids(owners)
            except Exception as exc:  # any failure: the next round tries again
                raise_if_cancelled()
                # Not one error may end this task: revoked keys' feeds would stay open.
                if not failing:
                    logger.warning("cannot check the account feeds' keys (%s); trying again", exc)
                failing = True
                continue
            failing = False
            for owner in set(owners) - live:
                logger.info("API key %s revoked: closing its %d feed(s)", owner,
                            len(self.hub.feeds_of(owner)))
                for feed in self.hub.feeds_of(owner):
                    feed.revoked()

    async def _keep_clock(self) -> None:
        while True:
            try:
                synced = await self.store.sync_clock()
            except REDIS_DOWN_ERRORS as exc:
                logger.debug("cannot read Redis's clock: %s", exc)
                synced = False
            # A cancel that lands inside redis-py can come out as an error, or not at
            # all: without this check, close() would wait out the next sleep.
            raise_if_cancelled()
            await asyncio.sleep(CLOCK_SYNC_SECS if synced else CLOCK_RETRY_SECS)

    async def close(self) -> None:
        for task in (self._clock_task, self._feeds_task, *self._prunes):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._clock_task = self._feeds_task = None
        await self.hub.stop()
        await self.redis.aclose()
        await self.poll_redis.aclose()
        if self.pipe is not None:
            await self.pipe.aclose()
