"""The Procfile, run as a Procfile host would: honcho starts `web` and `worker`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient

from engine.core.config import PROJECT_ROOT
from engine.ops.redis_server import RedisServer, free_port
from tests.helpers import AUTH_HEADERS, eventually, submit_order, wait_until_ready


async def test_honcho_runs_web_and_worker_from_the_procfile(
    redis_server: RedisServer, clean_redis: None, tmp_path: Path
) -> None:
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        # `python` in the Procfile must be this interpreter, as on a Procfile host.
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "REDIS_URL": redis_server.url,
        "QUOTE_LATENCY_MS": "0",
        "CONFIRM_LATENCY_MIN_MS": "0",
        "CONFIRM_LATENCY_MAX_MS": "0",
        "VENUE_FAILURE_RATE": "0",
    }
    env.pop("SERVER_PORT", None)  # the web process must take the host's PORT
    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [f"{bin_dir}/honcho", "start", "--no-colour", "-p", str(port)],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    http = AsyncHTTPClient()
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(base, alive=lambda: proc.poll() is None, log=log_path)
        order_id = await submit_order(base)

        async def finished() -> Any:
            order = json.loads((await http.fetch(f"{base}/api/orders/{order_id}", headers=AUTH_HEADERS)).body)
            return order if order["status"] in ("confirmed", "failed") else None

        order = await eventually(finished, timeout=30, interval=0.05, message="order finished")
        assert order["status"] == "confirmed"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # what the host does on shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    assert "web.1" in log and "worker.1" in log
    assert "Traceback" not in log
    assert "stopped" in log  # the worker shut down gracefully
