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


# Settings whose values are never repeated, not even in a ConfigError.
_SECRET_VARIABLES = frozenset({"EVM_PRIVATE_KEY", "EVM_KEYSTORE_PASSWORD"})


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

    # Accounts (engine.core.accounts). ``auth``: API keys are required on every
    # /api/orders... HTTP call; False (AUTH=off) is for experiments only, and warned
    # of at every start. Each key may make ``rate_limit_per_sec`` calls a second on
    # average and ``rate_limit_burst`` at once (GCRA, atomic in Redis), unless its own
    # limits say otherwise. A client address may fail authentication
    # ``auth_failure_burst`` times at once, then once per ``auth_failure_interval_secs``.
    auth: bool = True
    rate_limit_per_sec: float = 20.0
    rate_limit_burst: int = 40
    auth_failure_burst: int = 10
    auth_failure_interval_secs: float = 6.0
    # Backpressure: POST answers 503 ``overloaded`` while this many orders wait for a
    # worker (accepted, not yet taken by one); 0 = no limit.
    max_queue_lag: int = 10_000

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

    # Which market the worker trades on: "simulated" (needs nothing but Python) or
    # "evm" (Uniswap-V2-compatible routers on an EVM chain, engine.execution.venues.evm).
    market: str = "simulated"
    # MARKET=evm. The node's JSON-RPC URL; None starts a local devnet (anvil with the
    # real Uniswap V2 contracts, engine.ops.devnet) on ``devnet_port``.
    evm_rpc_url: str | None = None
    # The chain file (schemas/evm_chain.json): tokens, venues (router addresses), the
    # wallet. Default: what the devnet writes, ``data_dir / "devnet.json"``.
    evm_chain_file: Path | None = None
    # The wallet's key: EVM_PRIVATE_KEY (0x + 64 hex digits), or an encrypted keystore
    # file (EIP-2335-style V3 JSON) and the variable that holds its password. Never in
    # repr, logs, errors or /metrics.
    evm_private_key: str | None = dataclasses.field(default=None, repr=False)
    evm_keystore: Path | None = None
    evm_keystore_password: str | None = dataclasses.field(default=None, repr=False)
    # A receipt this many blocks deep (its own block counts as 1) is final.
    confirmations: int = 1
    # Cap on the EIP-1559 maxFeePerGas, in gwei.
    evm_max_fee_gwei: float = 500.0
    # A swap's deadline (Router02's ``deadline`` argument), seconds after signing.
    evm_deadline_secs: int = 600
    # A sent transaction still unmined after this long is replaced: the same swap and
    # nonce, higher fees (engine.execution.driver).
    tx_stuck_secs: float = 60.0
    # The local devnet (MARKET=evm without EVM_RPC_URL).
    devnet_port: int = 8545
    # Seconds between blocks; 0 = automine (a block per transaction).
    devnet_block_time_secs: float = 0.0
    # A background trader swapping now and then on the devnet's pools, so prices move.
    devnet_trader: bool = True
    devnet_trader_interval_secs: float = 2.0

    @property
    def chain_file(self) -> Path:
        """The EVM chain file to read: EVM_CHAIN_FILE, else the devnet's."""
        return self.evm_chain_file or self.data_dir / "devnet.json"

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
                shown = "<secret>" if name in _SECRET_VARIABLES else repr(raw)
                raise ConfigError(f"{name}={shown}: {exc}") from None

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
            auth=get("AUTH", _bool, d.auth),
            rate_limit_per_sec=get("RATE_LIMIT_PER_SEC", _positive(float), d.rate_limit_per_sec),
            rate_limit_burst=get("RATE_LIMIT_BURST", _positive(int), d.rate_limit_burst),
            auth_failure_burst=get("AUTH_FAILURE_BURST", _positive(int), d.auth_failure_burst),
            auth_failure_interval_secs=get(
                "AUTH_FAILURE_INTERVAL_SECS", _positive(float), d.auth_failure_interval_secs
            ),
            max_queue_lag=get("MAX_QUEUE_LAG", _non_negative(int), d.max_queue_lag),
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
            market=get("MARKET", _choice("simulated", "evm"), d.market),
            evm_rpc_url=get("EVM_RPC_URL", _rpc_url, d.evm_rpc_url),
            evm_chain_file=get("EVM_CHAIN_FILE", Path, d.evm_chain_file),
            evm_private_key=get("EVM_PRIVATE_KEY", _private_key, d.evm_private_key),
            evm_keystore=get("EVM_KEYSTORE", Path, d.evm_keystore),
            evm_keystore_password=env.get("EVM_KEYSTORE_PASSWORD") or d.evm_keystore_password,
            confirmations=get("CONFIRMATIONS", _positive(int), d.confirmations),
            evm_max_fee_gwei=get("EVM_MAX_FEE_GWEI", _positive(float), d.evm_max_fee_gwei),
            evm_deadline_secs=get("EVM_DEADLINE_SECS", _positive(int), d.evm_deadline_secs),
            tx_stuck_secs=get("TX_STUCK_SECS", _positive(float), d.tx_stuck_secs),
            devnet_port=get("DEVNET_PORT", _port, d.devnet_port),
            devnet_block_time_secs=get(
                "DEVNET_BLOCK_TIME_SECS", _non_negative(float), d.devnet_block_time_secs
            ),
            devnet_trader=get("DEVNET_TRADER", _bool, d.devnet_trader),
            devnet_trader_interval_secs=get(
                "DEVNET_TRADER_INTERVAL_SECS", _positive(float), d.devnet_trader_interval_secs
            ),
        )
        if cfg.confirm_latency_max_ms < cfg.confirm_latency_min_ms:
            raise ConfigError(
                "CONFIRM_LATENCY_MAX_MS must be >= CONFIRM_LATENCY_MIN_MS "
                f"({cfg.confirm_latency_max_ms} < {cfg.confirm_latency_min_ms})"
            )
        # Bounds that keep the rate limits' arithmetic exact (engine.core.accounts).
        if not 0.001 <= cfg.rate_limit_per_sec <= 1_000_000:
            raise ConfigError("RATE_LIMIT_PER_SEC must be from 0.001 to 1000000")
        if cfg.rate_limit_burst > 1_000_000 or cfg.auth_failure_burst > 1_000_000:
            raise ConfigError("RATE_LIMIT_BURST and AUTH_FAILURE_BURST must be at most 1000000")
        if cfg.auth_failure_interval_secs > 86_400:
            raise ConfigError("AUTH_FAILURE_INTERVAL_SECS must be at most 86400 (a day)")
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


def _rpc_url(raw: str) -> str:
    if not re.match(r"^(https?|wss?)://[^\s/]+", raw):
        raise ValueError("expected an http://, https://, ws:// or wss:// URL")
    return raw


def _private_key(raw: str) -> str:
    # Never echo the value: ConfigError repeats what it is given.
    if not re.fullmatch(r"(0x)?[0-9a-fA-F]{64}", raw):
        raise ValueError("expected 0x and 64 hex digits")
    return raw if raw.startswith("0x") else "0x" + raw


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
