"""Helpers shared by the tests: waiting with a deadline, HTTP and WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from engine.core.config import PROJECT_ROOT
from engine.ops.redis_server import stop_process
from tests.contract import check_message

# The tests' API key: a fixed one, so that raw requests can carry it (the fixtures
# store it in each test's Redis: conftest.api_key, faults.cluster.Cluster).
TEST_API_KEY = "oek_7e57000000000001_" + "T" * 43
AUTH_HEADERS = {"Authorization": f"Bearer {TEST_API_KEY}"}
TEST_KEY_ID = "7e57000000000001"  # its id: the owner of the orders it places

VALID_ORDER: dict[str, Any] = {
    "token_in": "SOL",
    "token_out": "USDC",
    "amount": 12.5,
    "order_type": "market",
    "max_slippage": 0.05,
}


async def eventually(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "condition",
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout} s")
        await asyncio.sleep(interval)


def start_server(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python server.py`` in its own process, with ``env``; its output in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "server.py")], env=dict(env), stdout=log, stderr=log
        )


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, as a Procfile host sends it; SIGKILL if it outlives ``timeout``."""
    stop_process(proc, timeout)


async def wait_until_ready(
    base: str, *, alive: Callable[[], bool] | None = None, log: Any = None,
    path: str = "/readyz", timeout: float = 30.0,
) -> None:
    """Until ``base + path`` answers 200 (a process started by a test is up). With
    ``alive``, fail at once, showing ``log`` (a Path), if the process has died."""
    http = AsyncHTTPClient()

    async def ready() -> bool:
        if alive is not None:
            assert alive(), log.read_text() if log is not None else "the process died"
        try:
            return (await http.fetch(base + path, raise_error=False)).code == 200
        except OSError:
            return False

    await eventually(ready, timeout=timeout, interval=0.05, message=f"{base}{path} answering")


async def submit_order(base: str, api_key: str = TEST_API_KEY) -> str:
    """POST a valid order to a running server at ``base``; its order id."""
    response = await AsyncHTTPClient().fetch(
        f"{base}/api/orders/execute", method="POST", body=json.dumps(VALID_ORDER),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    return str(json.loads(response.body)["order_id"])


async def post_order(
    client: Any,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[HTTPResponse, dict[str, Any]]:
    """POST to /api/orders/execute; returns the response and its decoded JSON body."""
    payload = raw if raw is not None else json.dumps(VALID_ORDER if body is None else body).encode()
    response = await client.fetch(
        "/api/orders/execute",
        method="POST",
        body=payload,
        headers={"Content-Type": "application/json", **(headers or {})},
        raise_error=False,
    )
    return response, json.loads(response.body)


async def post_chunked(client: Any, chunks: list[bytes]) -> Any:
    """POST the chunks as a chunked body (no Content-Length)."""

    async def produce(write: Any) -> None:
        for chunk in chunks:
            await write(chunk)

    return await client.fetch(
        "/api/orders/execute",
        method="POST",
        body_producer=produce,
        headers={"Content-Type": "application/json"},
        raise_error=False,
    )


async def open_socket(client: Any, headers: dict[str, str] | None = None) -> WebSocketClientConnection:
    """A WebSocket to /api/orders/status of the test server."""
    from tornado.httpclient import HTTPRequest

    url = client.get_url("/api/orders/status").replace("http://", "ws://")
    return await websocket_connect(HTTPRequest(url, headers=headers or {}))


async def read_until_closed(ws: WebSocketClientConnection, timeout: float = 10.0) -> list[str]:
    """Every message until the server closes the socket."""
    messages = []
    while True:
        message = await asyncio.wait_for(ws.read_message(), timeout)
        if message is None:
            ws.close()  # releases the client side (else a ResourceWarning at GC)
            return messages
        assert isinstance(message, str)
        check_message(message)
        messages.append(message)
