"""Log set-up: text by default, one JSON object per line with LOG_FORMAT=json; the
access log names the client, from proxy headers only when they are trusted."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import threading
from collections.abc import Iterator

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.netutil import bind_sockets
from tornado.web import Application

from engine.core.config import Config
from engine.ops.logs import LOG_QUEUE_MAX, setup_logging, stop_logging
from server import make_http_server


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    stop_logging()
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
    stop_logging()  # the writer thread writes what is queued
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
    stop_logging()
    assert stream.getvalue().count("\n") == 1
    assert " web WARNING x: shown" in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_a_stalled_log_never_blocks_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr a pipe nobody reads (a stalled terminal or log collector): logging goes
    on without waiting, the records past the queue's bound are dropped and counted,
    and the writer says so once the pipe drains."""
    read_end, write_end = os.pipe()
    stalled = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr("sys.stderr", stalled)
    setup_logging(Config(), "web")
    lines = 3 * LOG_QUEUE_MAX
    logger = logging.getLogger("engine.web")
    done = threading.Event()

    def log_them() -> None:
        for i in range(lines):
            logger.info("line %d", i)
        done.set()

    caller = threading.Thread(target=log_them, daemon=True)
    caller.start()
    # A bound on hanging, not a speed target: a synchronous handler never returns
    # here (the pipe holds 64 KiB).
    assert done.wait(60), "logging blocked on a stalled stderr"
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read_all(read_end)), daemon=True)
    reader.start()
    stop_logging()
    stalled.close()
    reader.join(60)
    text = received.decode()
    dropped = [line for line in text.splitlines() if "log records dropped" in line]
    assert len(dropped) == 1 and " line " not in dropped[0]
    written = text.count(": line ")
    assert LOG_QUEUE_MAX <= written < lines
    assert int(dropped[0].split(" WARNING engine.ops.logs: ")[1].split()[0]) == lines - written


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


@pytest.mark.usefixtures("restore_logging")
def test_a_record_is_rendered_when_it_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging(Config(), "worker")
    state = {"status": "pending"}
    logging.getLogger("x").warning("order is %s", state)
    state["status"] = "confirmed"  # changed before the writer thread gets to it
    stop_logging()
    assert "order is {'status': 'pending'}" in stream.getvalue()


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
