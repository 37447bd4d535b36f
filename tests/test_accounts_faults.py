"""Accounts across real processes (issue 16): two web processes on one real Redis,
keys made and revoked with the CLI (``python -m engine.ops.api_keys``, and ``make
api-key``) as an operator would. Revocation is seen by the other web process at its
next call, the rate limit is exact across both (N allowed, N+1 refused), failed
authentications count per address across both, and an account feed closes when its
key is revoked."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from engine.core.config import PROJECT_ROOT
from tests.faults.cluster import Cluster, connections, start_web
from tests.helpers import VALID_ORDER, read_until_closed

KEY = re.compile(r"oek_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The key CLI against the cluster's Redis, as an operator runs it."""
    env = {**os.environ, "REDIS_URL": cluster.redis_url}
    return subprocess.run([sys.executable, "-m", "engine.ops.api_keys", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)


async def call(http: AsyncHTTPClient, url: str, key: str, method: str = "GET") -> Any:
    body = json.dumps(VALID_ORDER) if method == "POST" else None
    return await http.fetch(url, method=method, body=body, raise_error=False,
                            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


async def test_keys_limits_and_revocation_hold_across_two_web_processes(cluster: Cluster) -> None:
    async with connections(cluster) as (_redis, http):
        webs = [await start_web(cluster, http, AUTH_FAILURE_BURST="6") for _ in range(2)]

        # make api-key prints the key and nothing else on stdout.
        venv = Path(sys.executable).parent.parent
        made = subprocess.run(
            ["make", "-s", "api-key", "NAME=bob", "RATE=0.001", "BURST=10", f"VENV={venv}"],
            env={**os.environ, "REDIS_URL": cluster.redis_url}, cwd=PROJECT_ROOT,
            capture_output=True, text=True, timeout=120,
        )
        assert made.returncode == 0, made.stderr
        assert KEY.fullmatch(made.stdout.strip()) and made.stdout.count("\n") == 1, made.stdout
        bob = made.stdout.strip()

        # Exactly the burst passes, whichever process each call reaches.
        answers = await asyncio.gather(*(
            call(http, f"{webs[i % 2].base_url}/api/orders/execute", bob, "POST") for i in range(16)
        ))
        codes = sorted(answer.code for answer in answers)
        assert codes == [202] * 10 + [429] * 6, codes
        assert {answer.headers["RateLimit-Policy"] for answer in answers} == {'"per-key";q=10;w=10000'}

        # An account feed on the second process, a key listed by name, never shown.
        carol = cli(cluster, "create", "carol").stdout.strip()
        feed = await websocket_connect(HTTPRequest(webs[1].ws_url))
        await feed.write_message(f"Bearer {carol}")
        assert json.loads(await asyncio.wait_for(feed.read_message(), 10) or "{}")["subscribed"] == "orders"
        listed = cli(cluster, "list")
        assert listed.returncode == 0 and "bob" in listed.stdout and "carol" in listed.stdout
        assert not KEY.search(listed.stdout)
        assert (await call(http, f"{webs[1].base_url}/api/orders", carol)).code == 200

        # Revoked on one side: the other refuses it at its very next call.
        revoked = cli(cluster, "revoke", "carol")
        assert revoked.returncode == 0, revoked.stderr
        for web in webs:
            answer = await call(http, f"{web.base_url}/api/orders", carol)
            assert answer.code == 401 and 'error="invalid_token"' in answer.headers["WWW-Authenticate"]
        rest = await read_until_closed(feed, timeout=10)
        assert json.loads(rest[-1])["error"] == "unauthorized" and feed.close_code == 4401
        assert cli(cluster, "revoke", "carol").returncode == 1  # no live key of that name

        # Failed authentications count per address across both processes: the two
        # calls with carol's revoked key were two; four more reach the burst of six.
        wrong = "oek_0123456789abcdef_" + "x" * 43
        failures = [(await call(http, f"{webs[i % 2].base_url}/api/orders", wrong)).code for i in range(4)]
        assert failures == [401] * 4
        for web in webs:
            throttled = await call(http, f"{web.base_url}/api/orders", wrong)
            assert throttled.code == 429 and int(throttled.headers["Retry-After"]) >= 1


def test_the_cli_says_when_it_finds_no_running_system(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    env["DATA_DIR"] = str(tmp_path)
    found = subprocess.run([sys.executable, "-m", "engine.ops.api_keys", "list"], env=env,
                           capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert found.returncode == 3 and "no running system found" in found.stderr
    assert "Traceback" not in found.stderr
