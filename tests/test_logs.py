"""Log set-up: text by default, one JSON object per line with LOG_FORMAT=json; the
access log names the client, from proxy headers only when they are trusted."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.netutil import bind_sockets
from tornado.web import Application

from engine.core.config import Config
from engine.ops.logs import setup_logging
from server import make_http_server


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("restore_logging")
def test_json_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging(dataclasses.replace(Config(), log_format="json"), "worker")
    logging.getLogger("engine.execution.driver").info("order %s: %s -> %s", "abc", "pending", "routing")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("worker").exception("task failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "order abc: pending -> routing"
    assert first["level"] == "info" and first["logger"] == "engine.execution.driver"
    assert first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_logging")
def test_text_log_lines_name_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging(dataclasses.replace(Config(), log_level="WARNING"), "web")
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    assert stream.getvalue().count("\n") == 1
    assert " web WARNING x: shown" in stream.getvalue()


@pytest.mark.parametrize("trusted", [False, True])
async def test_proxy_headers_name_the_client_only_when_trusted(
    app: Application, config: Config, caplog: pytest.LogCaptureFixture, trusted: bool
) -> None:
    server = make_http_server(app, dataclasses.replace(config, trust_proxy_headers=trusted))
    [sock] = bind_sockets(0, "127.0.0.1")
    server.add_sockets([sock])
    port = sock.getsockname()[1]
    try:
        with caplog.at_level(logging.INFO, logger="tornado.access"):
            response = await AsyncHTTPClient().fetch(
                f"http://127.0.0.1:{port}/healthz", headers={"X-Real-Ip": "203.0.113.7"}
            )
    finally:
        server.stop()
        await server.close_all_connections()
    assert response.code == 200
    [line] = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert ("(203.0.113.7)" in line) is trusted, line
    assert ("(127.0.0.1)" in line) is not trusted, line
