"""The objects a web process owns, built once at start and handed to the handlers."""

from __future__ import annotations

import dataclasses
from typing import Any

from redis.asyncio import Redis

from engine.config import Config
from engine.connections import connect, connect_pipelined
from engine.pipelined import PipelinedRedis
from engine.metrics import Metrics
from engine.schemas import Schemas
from engine.store import OrderStore
from engine.updates import StatusHub


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
    # The open status WebSockets (handlers.status.OrderStatusSocket), so that a
    # shutdown can close them with 1001 rather than drop them.
    open_sockets: set[Any] = dataclasses.field(default_factory=set)

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
        )

    async def close(self) -> None:
        await self.hub.stop()
        await self.redis.aclose()
        await self.poll_redis.aclose()
        if self.pipe is not None:
            await self.pipe.aclose()
