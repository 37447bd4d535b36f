"""Liveness and readiness probes, and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from engine.core import keys
from engine.core.connections import REDIS_DOWN_ERRORS
from engine.web.metrics import CONTENT_TYPE
from handlers.base import APIHandler

logger = logging.getLogger(__name__)


class HealthHandler(APIHandler):
    """GET /healthz: the process is up and serving (no dependency is checked)."""

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(APIHandler):
    """GET /readyz: Redis answers, so orders can be accepted (503 otherwise). With
    MARKET=evm, also the chain's health as the workers last saw it: ``"chain":
    {"status": "ok", "block": n, "age_secs": s, "block_age_secs": b}`` (``b``: how
    old that head block is, by its timestamp) when a worker read the node's head
    in the last 10 s, else ``{"status": "unknown"}`` (no worker, or the node does
    not answer). Orders are accepted either way: they wait in the queue."""

    async def get(self) -> None:
        async with self.redis_guard():
            await self.services.redis.ping()
            chain = await self.services.redis.get(keys.CHAIN_HEALTH) if self.services.config.market == "evm" else None
        answer: dict[str, Any] = {"status": "ready"}
        if self.services.config.market == "evm":
            answer["chain"] = {"status": "unknown"}
            if chain:
                seen = json.loads(chain)
                answer["chain"] = {"status": "ok", "block": int(seen["block"]),
                                   "age_secs": round(max(0.0, time.time() - float(seen["at"])), 1)}
                if "block_time" in seen:  # how old the head block is: a chain that stopped making blocks
                    answer["chain"]["block_age_secs"] = round(max(0.0, time.time() - float(seen["block_time"])), 1)
        self.write_json(answer)


class MetricsHandler(APIHandler):
    """GET /metrics: Prometheus text format. With Redis down, the system-wide figures
    are the last ones read, and this process's own are current."""

    async def get(self) -> None:
        services = self.services
        services.metrics.subscribers.set(services.hub.subscriber_count)
        try:
            async with asyncio.timeout(services.config.redis_timeout_secs):
                await services.metrics.refresh(services.redis, services.store)
        except (*REDIS_DOWN_ERRORS, TimeoutError) as exc:
            logger.warning("metrics: cannot read Redis (%s); serving the last figures", exc)
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(services.metrics.render())
