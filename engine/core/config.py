"""Settings, read once from the environment into a frozen dataclass.

Every setting has a default that works on a fresh machine; a bad value stops the
process at start with one clear line (see ``ConfigError``), never later.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


class ConfigError(ValueError):
    """A setting in the environment has a value we cannot use."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the web and worker processes can be told from outside."""

    host: str = "0.0.0.0"
    port: int = 3000
    # None means embedded mode: start a local redis-server under ``data_dir``.
    redis_url: str | None = None
    data_dir: Path = PROJECT_ROOT / "data"
    # Origins of browser pages allowed to place and cancel orders, open the status
    # WebSocket, and read answers (CORS). Clients that send no Origin are always
    # allowed, and so is the service's own origin when reached by IP address or
    # localhost; a page under a host name must be listed (handlers.base.origin_allowed).
    allowed_origins: tuple[str, ...] = ()
    # Take the client's address and scheme from X-Forwarded-For / X-Real-Ip /
    # X-Forwarded-Proto. Only behind a proxy that sets them (a Procfile host's router
    # does): otherwise any client could put any address in the logs.
    trust_proxy_headers: bool = False
    log_level: str = "INFO"
    log_format: str = "text"  # "text" or "json"

    # Web processes sharing the port (a pre-fork supervisor runs them); 1 = no fork.
    web_concurrency: int = 1

    # Redis client behaviour. Request-path commands must fail fast (503) when Redis
    # is unreachable rather than hang: redis-py 8 would wait 5 s by default.
    redis_timeout_secs: float = 1.5
    # XREAD BLOCK for the status poller; kept well below the socket timeout.
    poll_block_ms: int = 1000
    # orders:events is trimmed approximately to this many entries. Subscribers
    # recover a gap from the per-order stream, so trimming never loses a status.
    events_maxlen: int = 100_000
    # Finished orders (hash + per-order events) expire after this long.
    order_ttl_secs: int = 7 * 24 * 3600
    idempotency_ttl_secs: int = 24 * 3600
    ws_first_message_timeout_secs: float = 10.0

    # Worker.
    # The worker's consumer name in the group (WORKER_NAME, else a Procfile host's
    # DYNO, e.g. "worker.1"). A name that survives a restart lets the new process
    # resume its predecessor's orders at once; None: a new unique name per process.
    worker_name: str | None = None
    worker_concurrency: int = 64
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    shutdown_grace_secs: float = 10.0

    # Simulated venues.
    price_seed: int = 42
    quote_latency_ms: float = 100.0
    confirm_latency_min_ms: float = 400.0
    confirm_latency_max_ms: float = 1000.0
    venue_failure_rate: float = 0.02

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read settings from ``environ`` (default ``os.environ``); raise ConfigError."""
        env = os.environ if environ is None else environ
        d = cls()

        def get(name: str, parse: Callable[[str], T], default: T) -> T:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                return parse(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None

        port_var = "SERVER_PORT" if env.get("SERVER_PORT", "").strip() else "PORT"
        cfg = cls(
            host=get("HOST", str, d.host),
            port=get(port_var, _port, d.port),
            redis_url=get("REDIS_URL", _redis_url, d.redis_url),
            data_dir=get("DATA_DIR", Path, d.data_dir),
            allowed_origins=get("ALLOWED_ORIGINS", _origins, d.allowed_origins),
            trust_proxy_headers=get("TRUST_PROXY_HEADERS", _bool, d.trust_proxy_headers),
            log_level=get("LOG_LEVEL", _log_level, d.log_level),
            log_format=get("LOG_FORMAT", _choice("text", "json"), d.log_format),
            web_concurrency=get("WEB_CONCURRENCY", _positive(int), d.web_concurrency),
            redis_timeout_secs=get("REDIS_TIMEOUT_SECS", _positive(float), d.redis_timeout_secs),
            poll_block_ms=get("POLL_BLOCK_MS", _positive(int), d.poll_block_ms),
            events_maxlen=get("EVENTS_MAXLEN", _positive(int), d.events_maxlen),
            order_ttl_secs=get("ORDER_TTL_SECS", _positive(int), d.order_ttl_secs),
            idempotency_ttl_secs=get(
                "IDEMPOTENCY_TTL_SECS", _positive(int), d.idempotency_ttl_secs
            ),
            ws_first_message_timeout_secs=get(
                "WS_FIRST_MESSAGE_TIMEOUT_SECS", _positive(float), d.ws_first_message_timeout_secs
            ),
            worker_name=get("WORKER_NAME", _worker_name, None)
            or get("DYNO", _worker_name, d.worker_name),
            worker_concurrency=get("WORKER_CONCURRENCY", _positive(int), d.worker_concurrency),
            claim_idle_ms=get("CLAIM_IDLE_MS", _positive(int), d.claim_idle_ms),
            max_deliveries=get("MAX_DELIVERIES", _positive(int), d.max_deliveries),
            shutdown_grace_secs=get(
                "SHUTDOWN_GRACE_SECS", _non_negative(float), d.shutdown_grace_secs
            ),
            price_seed=get("PRICE_SEED", int, d.price_seed),
            quote_latency_ms=get("QUOTE_LATENCY_MS", _non_negative(float), d.quote_latency_ms),
            confirm_latency_min_ms=get(
                "CONFIRM_LATENCY_MIN_MS", _non_negative(float), d.confirm_latency_min_ms
            ),
            confirm_latency_max_ms=get(
                "CONFIRM_LATENCY_MAX_MS", _non_negative(float), d.confirm_latency_max_ms
            ),
            venue_failure_rate=get("VENUE_FAILURE_RATE", _fraction, d.venue_failure_rate),
        )
        if cfg.confirm_latency_max_ms < cfg.confirm_latency_min_ms:
            raise ConfigError(
                "CONFIRM_LATENCY_MAX_MS must be >= CONFIRM_LATENCY_MIN_MS "
                f"({cfg.confirm_latency_max_ms} < {cfg.confirm_latency_min_ms})"
            )
        if cfg.poll_block_ms >= cfg.redis_timeout_secs * 1000 + 5000:
            raise ConfigError("POLL_BLOCK_MS must stay well below the Redis socket timeout")
        return cfg


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a whole number from 1 to 65535") from None
    if not 1 <= value <= 65535:
        raise ValueError("must be a whole number from 1 to 65535")
    return value


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
    for origin in origins:
        if not origin.startswith(("http://", "https://")):
            raise ValueError(f"origin {origin!r} must start with http:// or https://")
    return origins


def _worker_name(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", raw):
        raise ValueError("must be 1 to 64 letters, digits or . _ : -")
    return raw


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false (or 1/0, yes/no, on/off)")


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw.lower()

    return parse


def _number(kind: Callable[[str], T], raw: str) -> T:
    try:
        value = kind(raw)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise ValueError(f"must be {noun}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number")
    return value


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = _number(kind, raw)
        if not value > 0:  # type: ignore[operator]
            raise ValueError("must be greater than 0")
        return value

    return parse


def _non_negative(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = _number(kind, raw)
        if value < 0:  # type: ignore[operator]
            raise ValueError("must be 0 or more")
        return value

    return parse


def _fraction(raw: str) -> float:
    value = _number(float, raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value
