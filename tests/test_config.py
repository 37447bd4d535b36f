"""Configuration from the environment, and a bad value stopping the start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.config import PROJECT_ROOT, Config, ConfigError


def test_defaults() -> None:
    config = Config.from_env({})
    assert config.port == 3000
    assert config.redis_url is None and config.embedded_redis
    assert config.data_dir == PROJECT_ROOT / "data"


def test_server_port_wins_over_port() -> None:
    assert Config.from_env({"SERVER_PORT": "4000", "PORT": "5000"}).port == 4000
    assert Config.from_env({"PORT": "5000"}).port == 5000
    assert Config.from_env({"SERVER_PORT": " ", "PORT": "5000"}).port == 5000


def test_values_are_parsed() -> None:
    config = Config.from_env(
        {
            "REDIS_URL": "redis://cache:6379/1",
            "ALLOWED_ORIGINS": "https://app.example/, http://localhost:5173",
            "LOG_LEVEL": "debug",
            "WORKER_CONCURRENCY": "8",
            "VENUE_FAILURE_RATE": "0.25",
            "DATA_DIR": "/tmp/x",
            "TRUST_PROXY_HEADERS": "yes",
        }
    )
    assert config.trust_proxy_headers is True
    assert config.worker_name is None
    assert Config.from_env({"DYNO": "worker.2"}).worker_name == "worker.2"
    assert Config.from_env({"DYNO": "worker.2", "WORKER_NAME": "w-a"}).worker_name == "w-a"
    assert Config.from_env({"TRUST_PROXY_HEADERS": "0"}).trust_proxy_headers is False
    assert Config().trust_proxy_headers is False
    assert config.redis_url == "redis://cache:6379/1"
    assert config.allowed_origins == ("https://app.example", "http://localhost:5173")
    assert config.log_level == "DEBUG"
    assert config.worker_concurrency == 8
    assert config.venue_failure_rate == 0.25
    assert config.data_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SERVER_PORT": "abc"}, "SERVER_PORT='abc': must be a whole number from 1 to 65535"),
        ({"PORT": "70000"}, "PORT='70000'"),
        ({"REDIS_URL": "localhost:6379"}, "must start with redis://"),
        ({"WORKER_CONCURRENCY": "0"}, "must be greater than 0"),
        ({"WORKER_CONCURRENCY": "1.5"}, "must be a whole number"),
        ({"VENUE_FAILURE_RATE": "2"}, "between 0 and 1"),
        ({"QUOTE_LATENCY_MS": "nan"}, "finite"),
        ({"LOG_FORMAT": "xml"}, "must be one of text, json"),
        ({"ALLOWED_ORIGINS": "app.example"}, "must start with http"),
        ({"TRUST_PROXY_HEADERS": "maybe"}, "must be true or false"),
        ({"WORKER_NAME": "two words"}, "WORKER_NAME='two words': must be 1 to 64"),
        ({"CONFIRM_LATENCY_MIN_MS": "900", "CONFIRM_LATENCY_MAX_MS": "100"}, "CONFIRM_LATENCY_MAX_MS"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Config.from_env(env)
    assert fragment in str(refused.value)


@pytest.mark.parametrize("entry_point", ["server.py", "worker.py"])
def test_a_bad_value_stops_the_start_with_one_line_and_exit_2(entry_point: str) -> None:
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / entry_point)],
        env={"SERVER_PORT": "abc", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "SERVER_PORT='abc'" in lines[0]
