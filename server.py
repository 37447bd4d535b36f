"""Web entry point (Procfile ``web``): the order API and the status WebSocket.

With ``REDIS_URL`` unset this is the whole system on one machine: it starts an
embedded redis-server (AOF under DATA_DIR) and a worker process beside itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from redis.exceptions import RedisError
from tornado.netutil import bind_sockets
from tornado.web import Application

from engine.core.config import PROJECT_ROOT, Config, ConfigError
from engine.ops import prefork, runtime
from engine.ops.api_keys import embedded_redis_dir, ensure_dev_key
from engine.ops.devnet_keys import WALLET_KEY
from engine.ops.logs import setup_logging
from engine.ops.redis_server import (
    RedisServer,
    RedisServerError,
    die_with_parent,
    stop_process,
)
from engine.web import apidocs
from engine.web.services import Services
from handlers.base import NotFoundHandler, request_logger
from handlers.health import HealthHandler, MetricsHandler, ReadyHandler
from handlers.http1 import JSONHTTPServer
from handlers.orders import ExecuteOrderRouter, OrderHandler, OrderListHandler
from handlers.schemas import ApiDocumentHandler, SchemaHandler, SchemaIndexHandler
from handlers.status import CLOSE_GOING_AWAY, OrderStatusSocket

logger = logging.getLogger("server")

# WebSocket keep-alive: a ping every 20 s finds dead peers (and keeps proxies, such
# as a Procfile host's router with its 55 s idle limit, from cutting the socket).
WS_PING_INTERVAL_SECS = 20
WS_PING_TIMEOUT_SECS = 20
# The only message a client sends is an order id (36 characters).
WS_MAX_MESSAGE_BYTES = 1024
# Hard cap for any request body; the order endpoint enforces 16 KiB itself, as JSON.
MAX_BODY_BYTES = 1024 * 1024
SHUTDOWN_GRACE_SECS = 5.0
# How long a shutdown waits for clients to answer the status sockets' close frames.
WS_CLOSE_WAIT_SECS = 2.0


def make_app(services: Services) -> Application:
    """The Tornado application; no side effects (the caller starts the poller)."""
    deps = {"services": services}
    openapi = {**deps, "document": apidocs.render(apidocs.openapi(services.schemas)).encode()}
    asyncapi = {**deps, "document": apidocs.render(apidocs.asyncapi(services.schemas)).encode()}
    execute = ExecuteOrderRouter(services)
    app = Application(
        [
            (r"/api/orders/execute", execute),
            (r"/api/orders", OrderListHandler, deps),
            (r"/api/orders/status", OrderStatusSocket, deps),
            (r"/api/orders/([^/]+)", OrderHandler, deps),
            (r"/api/openapi\.json", ApiDocumentHandler, openapi),
            (r"/api/asyncapi\.json", ApiDocumentHandler, asyncapi),
            (r"/api/schemas", SchemaIndexHandler, deps),
            (r"/api/schemas/([A-Za-z0-9_.-]+)", SchemaHandler, deps),
            (r"/healthz", HealthHandler, deps),
            (r"/readyz", ReadyHandler, deps),
            (r"/metrics", MetricsHandler, deps),
        ],
        log_function=request_logger(services),
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        websocket_ping_interval=WS_PING_INTERVAL_SECS,
        websocket_ping_timeout=WS_PING_TIMEOUT_SECS,
        websocket_max_message_size=WS_MAX_MESSAGE_BYTES,
    )
    execute.application = app
    return app


def make_http_server(app: Application, config: Config) -> JSONHTTPServer:
    """The HTTP server of a web process: Tornado's, with the HTTP/1.1 fixes of
    handlers/http1.py (JSON for malformed requests, chunk extensions, lingering close)."""
    # xheaders costs a getaddrinfo per request (3% of a POST's CPU, measured), and
    # without a proxy in front it would let clients choose the logged address.
    return JSONHTTPServer(app, max_body_size=MAX_BODY_BYTES, xheaders=config.trust_proxy_headers)


async def serve(config: Config, redis_url: str, sockets: list[socket.socket]) -> None:
    """Serve on ``sockets`` until SIGTERM or SIGINT, then shut down gracefully."""
    services = Services.create(config, redis_url)
    app = make_app(services)
    server = make_http_server(app, config)
    server.add_sockets(sockets)
    services.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime.settle_heap()  # after the handlers: a SIGTERM meanwhile still stops gracefully
    logger.info("listening on http://%s:%s (redis %s)", config.host, config.port, redis_url)
    await stop.wait()
    logger.info("shutting down")
    server.stop()
    await close_websockets(services)
    try:
        await asyncio.wait_for(server.close_all_connections(), SHUTDOWN_GRACE_SECS)
    except TimeoutError:
        logger.warning("connections still open after %s s; closing anyway", SHUTDOWN_GRACE_SECS)
    await services.close()


async def close_websockets(services: Services) -> None:
    """Close every status socket with 1001 (going away): its client reconnects, to
    another web process, and gets the statuses it has not seen. Tornado's
    close_all_connections leaves WebSockets open, and the loop's end would then
    drop them without a close frame."""
    sockets = list(services.open_sockets)
    if not sockets:
        return
    logger.info("closing %d status socket(s)", len(sockets))
    for socket_ in sockets:
        socket_.close(CLOSE_GOING_AWAY, "server shutting down")
    deadline = asyncio.get_running_loop().time() + WS_CLOSE_WAIT_SECS
    while services.open_sockets and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def run_web(config: Config, redis_url: str, sockets: list[socket.socket]) -> int:
    """One web process, or WEB_CONCURRENCY of them under a pre-fork supervisor."""
    if config.web_concurrency == 1:
        runtime.run(serve(config, redis_url, sockets))
        return 0

    # The supervisor serves nothing: it logs synchronously, so no writer thread is
    # running (perhaps mid-write, holding stderr's lock) when it forks.
    setup_logging(config, "web", queued=False)
    # Start-up objects leave the collector's view before the fork, so the children
    # share their pages instead of each copying them on its first collection.
    runtime.freeze_before_fork()

    def child(slot: int) -> int:
        setup_logging(config, f"web.{slot}")
        runtime.run(serve(config, redis_url, sockets))
        return 0

    return prefork.supervise(config.web_concurrency, child)


def start_worker(redis_url: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Embedded mode: run worker.py beside the web process, against the same Redis
    (and ``extra_env``: the devnet's node, chain file and wallet)."""
    env = {**os.environ, "REDIS_URL": redis_url, **(extra_env or {})}
    # Its own session: a Ctrl-C in the terminal reaches only this process, which then
    # stops the worker (gracefully) before Redis.
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "worker.py")],
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


# The devnet deploys in a few seconds; the first start also waits for anvil.
DEVNET_START_TIMEOUT_SECS = 120.0


class DevnetError(RuntimeError):
    """The local devnet did not start."""


def start_devnet(config: Config) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """MARKET=evm without EVM_RPC_URL: run the local devnet (``python -m
    engine.ops.devnet``: anvil, the Uniswap V2 contracts deployed, the background
    trader) and wait for its chain file. Returns the process and what the worker's
    environment needs to trade on it; raises DevnetError."""
    chain_file = config.data_dir / "devnet.json"
    chain_file.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "engine.ops.devnet", "--port", str(config.devnet_port),
        "--data-dir", str(config.data_dir), "--block-time", str(config.devnet_block_time_secs),
        "--trader-interval", str(config.devnet_trader_interval_secs),
    ]
    if not config.devnet_trader:
        command.append("--no-trader")
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, start_new_session=True, preexec_fn=die_with_parent)
    deadline = time.monotonic() + DEVNET_START_TIMEOUT_SECS
    while not chain_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, 5)
            raise DevnetError(f"the devnet did not start (see {config.data_dir / 'anvil.log'})")
        time.sleep(0.1)
    env = {
        "EVM_RPC_URL": f"http://127.0.0.1:{config.devnet_port}",
        "EVM_CHAIN_FILE": str(chain_file),
        # anvil's published dev key, for a local chain only; an explicit key wins.
        "EVM_PRIVATE_KEY": os.environ.get("EVM_PRIVATE_KEY") or WALLET_KEY,
    }
    return proc, env


def stop_worker(proc: subprocess.Popen[bytes], grace_secs: float) -> None:
    if stop_process(proc, grace_secs + 5):
        logger.warning("worker did not stop in time; killed it")


def main() -> int:
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"server: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config, "web")
    if not config.auth:
        logger.warning("AUTH=off: no API key is asked for; anyone who can reach this service "
                       "can place, read and cancel every order. For experiments only.")
    try:
        # Bound before anything starts, and before forking: every web process
        # accepts on the same socket.
        sockets = bind_sockets(config.port, config.host)
    except OSError as exc:
        print(f"server: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    embedded: RedisServer | None = None
    worker: subprocess.Popen[bytes] | None = None
    devnet: subprocess.Popen[bytes] | None = None
    redis_url = config.redis_url
    code = 0
    try:
        if redis_url is None:
            embedded = RedisServer(embedded_redis_dir(config.data_dir))
            try:
                redis_url = embedded.start()
            except RedisServerError as exc:
                print(f"server: cannot start the embedded Redis: {exc}", file=sys.stderr)
                return 1
            logger.info("embedded mode: Redis at %s, starting a worker", redis_url)
            if config.auth:
                try:
                    key_file, made = asyncio.run(ensure_dev_key(config, redis_url))
                except (OSError, RedisError) as exc:
                    print(f"server: cannot make the development API key: {exc}", file=sys.stderr)
                    return 1
                logger.info("%s development API key in %s (engine.client uses it; create "
                            "others with `make api-key NAME=...`)", "a new" if made else "the",
                            key_file)
            worker_env: dict[str, str] = {}
            if config.market == "evm" and config.evm_rpc_url is None:
                try:
                    devnet, worker_env = start_devnet(config)
                except DevnetError as exc:
                    print(f"server: cannot start the devnet: {exc}", file=sys.stderr)
                    return 1
                logger.info("devnet at %s, chain file %s", worker_env["EVM_RPC_URL"],
                            worker_env["EVM_CHAIN_FILE"])
            worker = start_worker(redis_url, worker_env)
        code = run_web(config, redis_url, sockets)
    finally:
        if worker is not None:
            stop_worker(worker, config.shutdown_grace_secs)
        if devnet is not None:
            stop_process(devnet, 10)
        if embedded is not None:
            embedded.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
