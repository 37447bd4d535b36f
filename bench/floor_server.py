"""The floor: the least a Tornado handler can do to accept an order into Redis.

``POST /api/orders/execute`` appends the raw body to a stream with one XADD (one
Redis round trip), then answers 202 with a fresh order id, like the service, and
does nothing else: no parsing, validation, idempotency or Lua. Same Tornado, same
redis-py client, same Redis, same logging level as the service under test, so the
service's latency divided by this one's is the cost of everything the service adds.

Run as ``python -m bench.floor_server --port P --redis-url redis://127.0.0.1:N/0``.
With ``--pipelined`` the XADD goes over ``engine.core.pipelined`` (the connection the
service's store scripts use) instead of redis-py: the floor with the service's own
client, for the comparison in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import signal
import sys
import uuid

from redis.asyncio import Redis
from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler

from engine.core.pipelined import PipelinedRedis

FLOOR_STREAM = "bench:floor"
# Keeps the stream from growing without bound over a long run.
FLOOR_STREAM_MAXLEN = 100_000


class FloorHandler(RequestHandler):
    """One XADD, then 202."""

    def initialize(self, redis: Redis, pipe: PipelinedRedis | None) -> None:
        self.redis = redis
        self.pipe = pipe

    async def post(self) -> None:
        if self.pipe is not None:
            await self.pipe.execute(
                "XADD", FLOOR_STREAM, "MAXLEN", "~", FLOOR_STREAM_MAXLEN, "*",
                "order", self.request.body,
            )
        else:
            await self.redis.xadd(
                FLOOR_STREAM, {"order": self.request.body}, maxlen=FLOOR_STREAM_MAXLEN,
                approximate=True,
            )
        self.set_status(202)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"order_id": str(uuid.uuid4()), "status": "pending"}))


class HealthHandler(RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


async def serve(port: int, redis_url: str, pipelined: bool = False) -> None:
    redis = Redis.from_url(redis_url, decode_responses=True, socket_timeout=2.0)
    pipe = PipelinedRedis.for_url(redis_url, connect_timeout=1.0, stall_secs=2.0) if pipelined else None
    app = Application(
        [
            (r"/api/orders/execute", FloorHandler, {"redis": redis, "pipe": pipe}),
            (r"/readyz", HealthHandler),
        ]
    )
    server = HTTPServer(app)
    server.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    await redis.aclose()
    if pipe is not None:
        await pipe.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--pipelined", action="store_true",
                        help="XADD over engine.core.pipelined instead of redis-py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.port, args.redis_url, args.pipelined))
    return 0


if __name__ == "__main__":
    sys.exit(main())
