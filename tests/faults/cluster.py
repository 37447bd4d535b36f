"""A whole system of real processes on loopback: redis-server, web processes, workers.

Every process is a child of the test process, logs to a file under the test's
``tmp_path`` and is killed by ``Cluster.close()`` (a fixture's teardown), even when the
test fails half-way or a process was left frozen by SIGSTOP. Children also get
SIGTERM if pytest itself dies (``die_with_parent``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from tornado.httpclient import AsyncHTTPClient

from engine.core import keys
from engine.core.config import PROJECT_ROOT, Config
from engine.ops.api_keys import store_key
from engine.ops.redis_server import RedisServer, die_with_parent, free_port
from tests.faults.clients import http_client
from tests.helpers import TEST_API_KEY, eventually

# Every variable Config.from_env reads: none is inherited from the shell running pytest.
_SETTINGS = {f.name.upper() for f in dataclasses.fields(Config)} | {"SERVER_PORT", "PORT"}

# Venues that answer at once and never fail: a fault test's faults are its own.
FAST_VENUES = {
    "QUOTE_LATENCY_MS": "0",
    "CONFIRM_LATENCY_MIN_MS": "0",
    "CONFIRM_LATENCY_MAX_MS": "0",
    "VENUE_FAILURE_RATE": "0",
}
# A killed or frozen worker's orders are taken over after 1 s instead of 30 s.
CLAIM_IDLE_MS = 1000
# Generous: starting a process takes well under a second on an idle machine, but the
# suite shares two cores with whatever else runs.
START_TIMEOUT_SECS = 30.0
STOP_GRACE_SECS = 10.0


class ServiceProcess:
    """``python server.py`` or ``python worker.py``, output in a log file."""

    def __init__(self, name: str, script: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / script)],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        self.stopped = False  # by SIGSTOP

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident memory (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def kill(self) -> int:
        """SIGKILL, as a crash or an OOM kill would; the exit status."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self) -> int:
        """SIGTERM and wait for a graceful exit (SIGKILL after a grace period)."""
        if self.alive():
            if self.stopped:
                self.thaw()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_SECS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def output(self, tail: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} (pid {self.pid}) ---\n{text[-tail:]}"

    def close(self) -> None:
        if self.alive():
            if self.stopped:
                self.thaw()
            self.proc.kill()
        self.proc.wait()
        self._log.close()


class WebProcess(ServiceProcess):
    def __init__(self, name: str, env: dict[str, str], log_path: Path, port: int) -> None:
        super().__init__(name, "server.py", env, log_path)
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/orders/status"


def add_test_key(redis_url: str, **limits: Any) -> None:
    """Store TEST_API_KEY in the Redis at ``redis_url`` (as `make api-key` would store
    a new key), with a rate limit high enough for load tests unless ``limits`` say."""
    store_key(redis_url, "test", TEST_API_KEY, **({"rate": 100_000.0, "burst": 100_000} | limits))


class Cluster:
    """One Redis, any number of web processes and workers, all on loopback."""

    def __init__(self, root: Path, **settings: str) -> None:
        self.root = root
        self.settings = {
            **FAST_VENUES,
            "CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
            "SHUTDOWN_GRACE_SECS": "2",
            "LOG_LEVEL": "INFO",
            **settings,
        }
        # The durability the README asks for in production: every write on disk
        # before Redis answers, so a 2xx survives a kill -9 of Redis.
        self.redis = RedisServer(root / "redis", appendfsync="always")
        self.processes: list[ServiceProcess] = []
        self._count = 0

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start_redis(self) -> None:
        """Start redis-server, and store the tests' API key in it (TEST_API_KEY; a
        high rate limit of its own: fault tests load the service)."""
        self.redis.start()
        add_test_key(self.redis_url)

    def kill_redis(self) -> None:
        """kill -9 redis-server; its port and data folder are kept for a restart."""
        assert self.redis.process is not None, "Redis is not running"
        self.redis.kill()

    def restart_redis(self) -> None:
        """Start redis-server again on the same port, from the same AOF."""
        self.redis.start()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
        env.update(self.settings)
        env["REDIS_URL"] = self.redis_url
        env.update(extra)
        return env

    def _log_path(self, kind: str) -> tuple[str, Path]:
        self._count += 1
        name = f"{kind}{self._count}"
        return name, self.root / f"{name}.log"

    def start_web(self, **extra: str) -> WebProcess:
        port = free_port()
        name, log = self._log_path("web")
        web = WebProcess(
            name, self.env(SERVER_PORT=str(port), HOST="127.0.0.1", **extra), log, port
        )
        self.processes.append(web)
        return web

    def start_worker(self, **extra: str) -> ServiceProcess:
        name, log = self._log_path("worker")
        worker = ServiceProcess(name, "worker.py", self.env(**extra), log)
        self.processes.append(worker)
        return worker

    async def wait_web_ready(self, web: WebProcess, http: AsyncHTTPClient) -> None:
        """Until ``/readyz`` answers 200 (the process is up and reaches Redis)."""

        async def ready() -> bool:
            if not web.alive():
                raise AssertionError(f"{web.name} exited\n{web.output()}")
            try:
                response = await http.fetch(f"{web.base_url}/readyz", raise_error=False)
            except OSError:
                return False
            return response.code == 200

        await eventually(ready, timeout=START_TIMEOUT_SECS, interval=0.05,
                         message=f"{web.name} ready")

    async def wait_worker_ready(self, worker: ServiceProcess, redis: Redis) -> str:
        """Until the worker's heartbeat key (with its pid) is in Redis; its consumer name."""

        async def beating() -> str | None:
            if not worker.alive():
                raise AssertionError(f"{worker.name} exited\n{worker.output()}")
            async for key in redis.scan_iter(match=keys.worker("*")):
                raw = await redis.get(key)
                if raw and json.loads(raw).get("pid") == worker.pid:
                    return str(key).removeprefix(keys.WORKER_PREFIX)
            return None

        consumer: str = await eventually(beating, timeout=START_TIMEOUT_SECS, interval=0.05,
                                         message=f"{worker.name} heartbeat")
        return consumer

    def client(self) -> Redis:
        """An asyncio client for the test's own reads (create it inside the test's loop)."""
        # Retries ride over the connections a Redis restart leaves dead in the pool.
        return Redis.from_url(
            self.redis_url,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=10),
            retry_on_error=[RedisConnectionError],
        )

    def logs(self) -> str:
        """The end of every process's log, for a failing assertion's message."""
        return "\n".join(p.output() for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.close()
        if self.redis.process is not None:
            self.redis.stop()


@contextlib.asynccontextmanager
async def connections(cluster: Cluster) -> AsyncIterator[tuple[Redis, AsyncHTTPClient]]:
    """The test's own Redis and HTTP clients, closed at the end."""
    redis = cluster.client()
    http = http_client()
    try:
        yield redis, http
    finally:
        http.close()
        await redis.aclose()


async def start_web(cluster: Cluster, http: AsyncHTTPClient, **settings: str) -> WebProcess:
    """A web process of ``cluster``, once it answers /readyz."""
    web = cluster.start_web(**settings)
    await cluster.wait_web_ready(web, http)
    return web
