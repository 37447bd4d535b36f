"""Embedded mode and durability: the real processes, as `make run` starts them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from engine.core import keys
from engine.core.config import PROJECT_ROOT, Config
from engine.core.connections import connect
from engine.core.store import OrderStore
from engine.ops.redis_server import RedisServer, free_port, stop_process
from tests.helpers import (
    VALID_ORDER,
    eventually,
    read_until_closed,
    start_server,
    stop_server,
    submit_order,
    wait_until_ready,
)


async def test_an_accepted_order_survives_a_redis_crash(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendfsync="always")
    server.start()
    config = Config(redis_url=server.url)
    client = connect(server.url, config)
    order_id = str(uuid.uuid4())
    try:
        result = await OrderStore(client, config).create(order_id, VALID_ORDER)
        assert result.outcome == "created"
        server.kill()  # SIGKILL: no shutdown save
        server.process = None
        restarted = RedisServer(tmp_path, port=server.port)
        restarted.start()
        try:
            plain = sync_redis.Redis(port=restarted.port, decode_responses=True)
            assert plain.hget(keys.order(order_id), "status") == "pending"
            assert plain.xlen(keys.ORDERS_STREAM) == 1
            assert plain.xlen(keys.order_events(order_id)) == 1
            assert plain.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
            plain.close()
        finally:
            restarted.stop()
    finally:
        await client.aclose()
        server.stop()


def test_start_fails_clearly_when_the_binary_is_missing(tmp_path: Path) -> None:
    from engine.ops.redis_server import RedisServerError

    server = RedisServer(tmp_path, binary=str(tmp_path / "no-such-redis-server"))
    with pytest.raises((RedisServerError, FileNotFoundError)):
        server.start()


@pytest.fixture
def embedded_system(tmp_path: Path) -> Any:
    """`python server.py` with no REDIS_URL: embedded Redis + web + worker."""
    port = free_port()
    env = {
        **os.environ,
        "SERVER_PORT": str(port),
        "DATA_DIR": str(tmp_path / "data"),
        "QUOTE_LATENCY_MS": "0",
        "CONFIRM_LATENCY_MIN_MS": "0",
        "CONFIRM_LATENCY_MAX_MS": "0",
        "VENUE_FAILURE_RATE": "0",
    }
    env.pop("REDIS_URL", None)
    proc = start_server(env, tmp_path / "server.log")
    yield proc, port, tmp_path
    stop_server(proc)


def _redis_server_pids(data_dir: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-f", "redis-server"], capture_output=True, text=True)
    pids = []
    for pid in found.stdout.split():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd.startswith(str(data_dir)):
            pids.append(pid)
    return pids


async def test_make_run_system_serves_orders_end_to_end(embedded_system: Any) -> None:
    proc, port, tmp_path = embedded_system
    base = f"http://127.0.0.1:{port}"
    await wait_until_ready(base, alive=lambda: proc.poll() is None, log=tmp_path / "server.log")
    # Embedded mode made a development key, and says where; orders need it.
    dev_key_file = tmp_path / "data" / "dev-api-key"
    assert f"development API key in {dev_key_file}" in (tmp_path / "server.log").read_text()
    assert dev_key_file.stat().st_mode & 0o777 == 0o600
    order_id = await submit_order(base, api_key=dev_key_file.read_text().strip())
    ws = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{port}/api/orders/status"))
    await ws.write_message(order_id)
    messages = [json.loads(m) for m in await read_until_closed(ws, timeout=30)]
    assert messages[0]["status"] == "pending"
    assert messages[-1]["status"] in ("confirmed", "failed")
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()

    proc.send_signal(signal.SIGTERM)
    await eventually(lambda: proc.poll() is not None, timeout=30, message="server exit")
    assert proc.returncode == 0
    assert _redis_server_pids(tmp_path) == []
    log = (tmp_path / "server.log").read_text()
    assert "embedded mode" in log and "Traceback" not in log


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in found.stdout.split())


async def test_web_concurrency_runs_and_replaces_web_processes(
    redis_server: RedisServer, clean_redis: None, tmp_path: Path
) -> None:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "SERVER_PORT": str(port), "WEB_CONCURRENCY": "2"}
    log_path = tmp_path / "web.log"
    proc = start_server(env, log_path)
    http = AsyncHTTPClient()
    try:
        await eventually(lambda: len(_children(proc.pid)) == 2, timeout=30, message="2 web processes")
        first = _children(proc.pid)

        async def serves() -> bool:
            try:
                return (await http.fetch(f"http://127.0.0.1:{port}/healthz", raise_error=False)).code == 200
            except OSError:
                return False

        await wait_until_ready(f"http://127.0.0.1:{port}", path="/healthz")
        os.kill(first[0], signal.SIGKILL)  # a web process crashes: another takes its place
        await eventually(
            lambda: len(_children(proc.pid)) == 2 and first[0] not in _children(proc.pid),
            timeout=30, message="replacement",
        )
        for _ in range(20):  # both processes answer on the one port
            assert await serves()
    finally:
        stop_server(proc)
    assert proc.returncode == 0, log_path.read_text()
    assert "starting another" in log_path.read_text()


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "server.py")],
            env={**os.environ, "SERVER_PORT": str(port), "HOST": "127.0.0.1", "DATA_DIR": str(tmp_path)},
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_stopping_web_process_closes_its_status_sockets_with_1001(
    redis_server: RedisServer, clean_redis: None, tmp_path: Path
) -> None:
    # No worker: the order stays pending, so its socket is open when SIGTERM comes.
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "SERVER_PORT": str(port)}
    log_path = tmp_path / "web.log"
    proc = start_server(env, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(base, alive=lambda: proc.poll() is None, log=log_path)
        order_id = await submit_order(base)
        ws = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{port}/api/orders/status"))
        await ws.write_message(order_id)
        assert json.loads(await ws.read_message() or "{}")["status"] == "pending"
        proc.send_signal(signal.SIGTERM)
        assert await read_until_closed(ws, timeout=10) == []
        assert ws.close_code == 1001, ws.close_reason
        await eventually(lambda: proc.poll() is not None, timeout=30, message="server exit")
    finally:
        stop_server(proc)
    assert proc.returncode == 0, log_path.read_text()
    assert "closing 1 status socket(s)" in log_path.read_text()


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_stop_process_terminates_and_kills_only_what_outlives_the_grace(ignores_sigterm: bool) -> None:
    handler = "signal.SIG_IGN" if ignores_sigterm else "signal.SIG_DFL"
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"import signal, sys, time; signal.signal(signal.SIGTERM, {handler}); print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # its handler is in place
    assert stop_process(proc, grace_secs=0.5) is ignores_sigterm
    assert proc.returncode == (-signal.SIGKILL if ignores_sigterm else -signal.SIGTERM)
    proc.stdout.close()
    assert stop_process(proc, grace_secs=0.5) is False  # already gone: nothing to do


async def test_the_dev_key_a_second_key_and_what_each_may_see(embedded_system: Any) -> None:
    """Issue 16's "done when", as a newcomer would do it: `make run`, the client places
    an order with the development key (no key given), `make api-key NAME=bob` finds the
    running embedded Redis and prints a second key; bob cannot see or cancel the first
    order, lists only his own, and is refused with 429 past his limit."""
    proc, port, tmp_path = embedded_system
    base = f"http://127.0.0.1:{port}"
    await wait_until_ready(base, alive=lambda: proc.poll() is None, log=tmp_path / "server.log")
    # As a user runs it: not inside `make test` (a make within a make prints
    # "Entering directory" lines; the user's top-level make prints none).
    outer = ("REDIS_URL", "ORDER_API_KEY", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    env = {name: value for name, value in os.environ.items() if name not in outer}
    env["DATA_DIR"] = str(tmp_path / "data")
    client = subprocess.run(
        [sys.executable, "-m", "engine.client", "SOL", "USDC", "1.5", "--url", base],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert client.returncode == 0, client.stderr
    first = client.stdout.splitlines()[0].removeprefix("order ")

    venv = Path(sys.executable).parent.parent
    made = subprocess.run(
        ["make", "api-key", "NAME=bob", "BURST=5", "RATE=0.001", f"VENV={venv}"],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert made.returncode == 0, made.stderr
    bob = made.stdout.strip()
    assert made.stdout == bob + "\n" and bob.startswith("oek_")  # the key, and nothing else

    http = AsyncHTTPClient()

    async def as_bob(path: str, method: str = "GET") -> Any:
        body = json.dumps(VALID_ORDER) if method == "POST" else None
        return await http.fetch(f"{base}{path}", method=method, body=body, raise_error=False,
                                headers={"Authorization": f"Bearer {bob}", "Content-Type": "application/json"})

    assert (await as_bob(f"/api/orders/{first}")).code == 404
    assert (await as_bob(f"/api/orders/{first}", "DELETE")).code == 404
    placed = await as_bob("/api/orders/execute", "POST")
    assert placed.code == 202
    listed = json.loads((await as_bob("/api/orders")).body)
    assert [order["order_id"] for order in listed["orders"]] == [json.loads(placed.body)["order_id"]]
    assert (await as_bob("/api/orders")).code == 200  # the fifth call of his burst of five
    refused = await as_bob("/api/orders/execute", "POST")
    assert refused.code == 429 and int(refused.headers["Retry-After"]) > 0
