"""Log set-up: text by default, one JSON object per line with LOG_FORMAT=json."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator

import pytest

from engine.config import Config
from engine.logs import setup_logging


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
    logging.getLogger("engine.executor").info("order %s: %s -> %s", "abc", "pending", "routing")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("worker").exception("task failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "order abc: pending -> routing"
    assert first["level"] == "info" and first["logger"] == "engine.executor"
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
