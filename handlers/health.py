"""Liveness and readiness probes."""

from __future__ import annotations

from handlers.base import APIHandler


class HealthHandler(APIHandler):
    """GET /healthz: the process is up and serving (no dependency is checked)."""

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(APIHandler):
    """GET /readyz: Redis answers, so orders can be accepted."""

    async def get(self) -> None:
        async with self.redis_guard():
            await self.services.redis.ping()
        self.write_json({"status": "ready"})
