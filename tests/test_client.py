"""The command-line client, run as a user would, against the app and a real worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tornado.testing import bind_unused_port

from engine import client
from engine.core import keys
from engine.core.config import PROJECT_ROOT, Config
from engine.execution.consumer import Consumer
from engine.execution.services import build_worker
from engine.ops.redis_server import RedisServer, free_port
from engine.web.schemas import Schemas
from engine.web.services import Services
from server import make_app, make_http_server
from tests.helpers import TEST_API_KEY, TEST_KEY_ID


async def run_client(*args: str, api_key: str | None = TEST_API_KEY) -> tuple[int, str, str]:
    """``python -m engine.client *args``, given ``api_key`` by ORDER_API_KEY (None: no
    key anywhere, not even a development key file)."""
    env = {name: value for name, value in os.environ.items() if name not in ("ORDER_API_KEY", "DATA_DIR")}
    if api_key is not None:
        env["ORDER_API_KEY"] = api_key
    else:
        env["DATA_DIR"] = "/nonexistent"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.client", *args,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def running(worker: Consumer) -> AsyncIterator[None]:
    """``worker`` executing orders for the duration of the block."""
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await task


async def test_client_submits_and_follows_an_order_to_confirmed(
    http_server_client: Any, services: Services, config: Config
) -> None:
    async with running(build_worker(services.redis, config)):
        code, out, err = await run_client(
            "SOL", "USDC", "1.5", "--slippage", "0.05", "--url", http_server_client.get_url("")
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("order ")
    assert [line.split("] ")[1].split()[0] for line in lines[1:6]] == [
        "pending", "routing", "building", "submitted", "confirmed"
    ]
    assert "confirmed: 1.5 SOL -> " in out and "\ntx 0x" in out


async def test_client_shows_why_an_order_is_refused(http_server_client: Any) -> None:
    code, _out, err = await run_client(
        "SOL", "SOL", "-1", "--slippage", "0.9", "--url", http_server_client.get_url("")
    )
    assert code == 2
    assert "order refused (400)" in err
    assert "max_slippage: must be between 0.01 and 0.5" in err
    assert "token_out: must be different from token_in" in err


async def test_client_reports_an_unreachable_service() -> None:
    code, _out, err = await run_client("SOL", "USDC", "1", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 3
    assert "cannot reach" in err


async def test_client_exits_1_with_the_reason_when_the_order_fails(
    http_server_client: Any, services: Services, config: Config
) -> None:
    import dataclasses

    broken = dataclasses.replace(config, venue_failure_rate=1.0)
    async with running(build_worker(services.redis, broken, retry_backoff_secs=0.01)):
        code, out, err = await run_client("SOL", "USDC", "2", "--url", http_server_client.get_url(""))
    assert code == 1
    assert "] failed" in out
    assert "failed: Retries exhausted after 3 attempts" in err


async def test_client_sends_and_shows_amounts_exactly(
    http_server_client: Any, services: Services, config: Config
) -> None:
    async with running(build_worker(services.redis, config)):
        code, out, err = await run_client(
            "SOL", "USDC", "0.000000001", "--url", http_server_client.get_url("")
        )  # one lamport: buys less than a micro-USDC
        big_code, big_out, _ = await run_client(
            "SOL", "USDC", "0.100000000", "--url", http_server_client.get_url("")
        )
    assert code == 1 and "less than the smallest unit of USDC" in err, err
    assert big_code == 0
    # Sent as typed, and amount_out shown in USDC's 6 decimals, exactly.
    line = next(line for line in big_out.splitlines() if line.startswith("confirmed: "))
    assert line.startswith("confirmed: 0.100000000 SOL -> ")
    assert len(line.split(" -> ")[1].split()[0].split(".")[1]) == 6, line


async def test_client_prints_a_safe_retry_when_the_outcome_is_unknown(
    lonely_redis: RedisServer, config: Config, schemas: Schemas
) -> None:
    # Redis frozen: the order reaches it and no answer comes back (a 504).
    config = dataclasses.replace(config, redis_url=lonely_redis.url)
    services = Services.create(config, lonely_redis.url, schemas)
    services.start()  # the status poller, for the retried order's statuses
    server = make_http_server(make_app(services), config)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    assert lonely_redis.process is not None
    try:
        os.kill(lonely_redis.process.pid, signal.SIGSTOP)
        try:
            code, _out, err = await run_client("SOL", "USDC", "1", "--url", f"http://127.0.0.1:{port}")
        finally:
            os.kill(lonely_redis.process.pid, signal.SIGCONT)
        assert code == 3
        assert "order refused (504): the order store did not answer in time" in err, err
        hint = next(line for line in err.splitlines() if line.startswith("retry safely with: "))
        argv = shlex.split(hint.removeprefix("retry safely with: "))
        assert argv[:3] == ["python", "-m", "engine.client"] and "--idempotency-key" in argv
        key = argv[argv.index("--idempotency-key") + 1]
        # The hint's command, run now Redis is back: the order, once, under that key.
        async with running(build_worker(services.redis, config)):
            retried, out, err = await run_client(*argv[3:])
        assert retried == 0, (out, err)
        order_id = out.splitlines()[0].removeprefix("order ")
        assert (await services.redis.get(keys.idempotency(TEST_KEY_ID, key)) or "").startswith(order_id)
        assert len(await services.redis.keys("order:*:events")) == 1
    finally:
        server.stop()
        await services.close()


async def test_client_without_a_key_is_told_how_to_get_one(http_server_client: Any) -> None:
    code, _out, err = await run_client("SOL", "USDC", "1", "--url", http_server_client.get_url(""),
                                       api_key=None)
    assert code == 2
    assert "order refused (401)" in err and "make api-key NAME=" in err and "dev-api-key" in err


def test_client_takes_its_key_from_the_flag_the_environment_or_the_dev_key_file(tmp_path: Path) -> None:
    (tmp_path / "dev-api-key").write_text("oek_from_the_file\n")
    here = {"DATA_DIR": str(tmp_path)}
    assert client.api_key("oek_flag", "http://localhost:3000", {"ORDER_API_KEY": "oek_env"}) == "oek_flag"
    assert client.api_key(None, "http://localhost", {"ORDER_API_KEY": "oek_env", **here}) == "oek_env"
    for local in ("http://localhost:3000", "http://127.0.0.1:3000", "http://[::1]:3000"):
        assert client.api_key(None, local, here) == "oek_from_the_file"
    # The dev key goes to this machine only; an explicit key goes anywhere.
    assert client.api_key(None, "https://orders.example.com", here) is None
    assert client.api_key(None, "http://10.0.0.5:3000", here) is None
    assert client.api_key("oek_flag", "https://orders.example.com", here) == "oek_flag"
    assert client.api_key(None, "http://localhost", {"DATA_DIR": str(tmp_path / "none")}) is None
