"""The command-line client, run as a user would, against the app and a real worker."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from engine.config import PROJECT_ROOT, Config
from engine.executor import Executor
from engine.redis_server import free_port
from engine.services import Services


async def run_client(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.client", *args,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_client_submits_and_follows_an_order_to_confirmed(
    http_server_client: Any, services: Services, config: Config
) -> None:
    worker = Executor(services.redis, config)
    task = asyncio.create_task(worker.run())
    try:
        code, out, err = await run_client(
            "SOL", "USDC", "1.5", "--slippage", "0.05", "--url", http_server_client.get_url("")
        )
    finally:
        worker.stop()
        await task
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
    worker = Executor(services.redis, broken, retry_backoff_secs=0.01)
    task = asyncio.create_task(worker.run())
    try:
        code, out, err = await run_client("SOL", "USDC", "2", "--url", http_server_client.get_url(""))
    finally:
        worker.stop()
        await task
    assert code == 1
    assert "] failed" in out
    assert "failed: Retries exhausted after 3 attempts" in err
