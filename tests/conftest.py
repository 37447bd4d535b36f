"""Fixtures: one real redis-server for the session, the app built by the same factory."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from pytest_tornasync.plugin import AsyncHTTPServerClient
from redis.asyncio import Redis
from tornado.ioloop import IOLoop
from tornado.web import Application

from engine.core.config import Config
from engine.core.connections import connect
from engine.core.store import OrderStore
from engine.ops.redis_server import RedisServer
from engine.web.schemas import Schemas
from engine.web.services import Services
from server import make_app, make_http_server
from tests.contract import check_response
from tests.devnet_fixtures import devnet  # noqa: F401 - the session's devnet, for any test
from tests.faults.cluster import Cluster, add_test_key
from tests.faults.report import Figures, figures_fixture
from tests.helpers import TEST_API_KEY


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for the whole session."""
    # fsync once a second: the suite runs many writes, and no test here crashes the
    # machine; the crash tests start their own server with appendfsync always.
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="everysec")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def lonely_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop, freeze and reconfigure."""
    server = RedisServer(tmp_path / "lonely", appendfsync="no")
    server.start()
    add_test_key(server.url)
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Figures:
    """The figures the fault and fuzz tests record (tests/faults/report.py)."""
    return figures_fixture(request, tmp_path_factory)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A Redis of the test's own (appendfsync always); the test starts the web
    processes and workers (tests/faults/cluster.py), all killed at the end."""
    system = Cluster(tmp_path)
    system.start_redis()
    try:
        yield system
    finally:
        system.close()


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    return Schemas()


@pytest.fixture
def config(redis_server: RedisServer, tmp_path: Path) -> Config:
    """Settings for a test: the session's Redis, zero-latency, never-failing venues."""
    return dataclasses.replace(
        Config(),
        redis_url=redis_server.url,
        data_dir=tmp_path,
        quote_latency_ms=0.0,
        confirm_latency_min_ms=0.0,
        confirm_latency_max_ms=0.0,
        venue_failure_rate=0.0,
        poll_block_ms=200,
        claim_idle_ms=500,
        shutdown_grace_secs=2.0,
        # Tests place many orders quickly, and fuzz keys; those of the limits set their own.
        rate_limit_per_sec=10_000.0,
        rate_limit_burst=10_000,
        auth_failure_burst=100_000,
    )


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> None:
    """Every test starts from an empty database (tests run one at a time), but for
    the tests' API key (TEST_API_KEY, with a rate limit high enough for load)."""
    client = sync_redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    add_test_key(redis_server.url)


@pytest.fixture
def redis(config: Config, clean_redis: None, io_loop: IOLoop) -> Iterator[Redis]:
    """An asyncio client for the test's own reads and writes."""
    assert config.redis_url is not None
    client = connect(config.redis_url, config)
    yield client
    io_loop.run_sync(client.aclose)


@pytest.fixture
def store(redis: Redis, config: Config) -> OrderStore:
    return OrderStore(redis, config)


@pytest.fixture
def services(config: Config, clean_redis: None, schemas: Schemas, io_loop: IOLoop) -> Iterator[Services]:
    """The web process's services, with the status poller running on the test's loop."""
    assert config.redis_url is not None
    services = Services.create(config, config.redis_url, schemas)
    io_loop.run_sync(_start_hub(services))
    yield services
    io_loop.run_sync(services.close)


def _start_hub(services: Services):  # type: ignore[no-untyped-def]
    async def start() -> None:
        services.start()

    return start


@pytest.fixture
def app(services: Services) -> Application:
    return make_app(services)


@pytest.fixture
def http_server(app: Application, config: Config, http_server_port: Any) -> Iterator[Any]:
    """Overrides pytest-tornasync's fixture of the same name: the server the web
    process runs (server.make_http_server: its body limit, its HTTP/1.1 connection)."""
    server = make_http_server(app, config)
    server.add_socket(http_server_port[0])
    yield server
    server.stop()


class CheckedClient(AsyncHTTPServerClient):
    """pytest-tornasync's test client, checking every answer against its schema, and
    sending ``api_key`` (``Authorization: Bearer``) unless the request has its own
    Authorization header or is made with ``anonymous=True``."""

    api_key: str | None = None

    async def fetch(self, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        anonymous = kwargs.pop("anonymous", False)
        headers = dict(kwargs.get("headers") or {})
        if self.api_key and not anonymous and not any(name.lower() == "authorization" for name in headers):
            kwargs["headers"] = {**headers, "Authorization": f"Bearer {self.api_key}"}
        response = await super().fetch(path, **kwargs)
        check_response(kwargs.get("method", "GET"), path.split("?")[0], response)
        return response


@pytest.fixture
def api_key(clean_redis: None) -> str:
    """The tests' API key, live in the test's Redis (clean_redis stores it)."""
    return TEST_API_KEY


@pytest.fixture
def http_server_client(http_server: Any, api_key: str) -> Iterator[CheckedClient]:
    """Overrides pytest-tornasync's fixture of the same name: sends ``api_key``."""
    client = CheckedClient(http_server=http_server)
    client.api_key = api_key
    yield client
    client.close()
