"""Every Redis key and stream name the service uses, in one place."""

from __future__ import annotations

# Stream of accepted orders, consumed by the worker's consumer group. Never trimmed
# by length (that could drop a pending entry); the worker XDELs entries once acked.
ORDERS_STREAM = "orders:new"
EXECUTORS_GROUP = "executors"
# Entries that kept failing, with the reason; for an operator to inspect.
DEAD_LETTER_STREAM = "orders:dead"
# Every status message of every order, for the web processes' live fan-out.
# Approximately trimmed (MAXLEN ~): a subscriber that misses an entry refills from
# the order's own stream.
EVENTS_STREAM = "orders:events"
# Hash: running totals for metrics: orders that reached each status, retries,
# dead letters.
COUNTERS = "orders:counters"
# String per live worker, with a TTL: its in-flight count (metrics).
WORKER_PREFIX = "worker:"
# Ledger of transactions sent to the simulated venues, by tx_hash.
LEDGER_PREFIX = "ledger:"


def order(order_id: str) -> str:
    """Hash: request, status, seq, timestamps, tx_hash, price, reason, attempts."""
    return f"order:{order_id}"


def order_events(order_id: str) -> str:
    """Stream: every status message of one order, in order (replay on connect)."""
    return f"order:{order_id}:events"


def idempotency(owner: str, key: str) -> str:
    """String: an API key's (``owner``'s) Idempotency-Key -> "order_id|body_hash",
    with a TTL. Scoped per API key: two clients may use the same value."""
    return f"idem:{owner}:{key}"


def worker(consumer: str) -> str:
    """String: a live worker's state as JSON, expiring unless refreshed."""
    return f"{WORKER_PREFIX}{consumer}"


def ledger(tx_hash: str) -> str:
    """Hash: one sent transaction of the simulated venues."""
    return f"{LEDGER_PREFIX}{tx_hash}"


def next_nonce(chain: str, address: str) -> str:
    """String: the next nonce no recorded transaction of the account holds on
    ``chain`` (``<chain id>:<genesis hash prefix>``); moved only by the atomic steps
    that record a transaction with its nonce (EVM venues)."""
    return f"nonce:{chain}:{address.lower()}"


def wallet_txs(chain: str, address: str) -> str:
    """Sorted set: every signed transaction of the account that took a nonce on
    ``chain``, scored by that nonce, recorded in the step that took it; trimmed below
    the account's mined nonce (EVM venues: EvmChain.reconcile)."""
    return f"wallet_txs:{chain}:{address.lower()}"


# String: JSON {"block", "at"} of the chain's latest block as a worker last read it
# (EVM venues), with a TTL: gone when no worker has reached the node lately. /readyz
# reports it.
CHAIN_HEALTH = "chain:health"


# Set: the ids of every API key ever created (revoked ones included), for listing.
API_KEYS = "api_keys"


def api_key(key_id: str) -> str:
    """Hash: one API key's record: ``digest`` (SHA-256 of the whole key, hex), ``name``,
    ``created_at`` (epoch seconds), optional ``rate``/``burst`` limits, and
    ``revoked_at`` once revoked (engine.core.accounts)."""
    return f"api_key:{key_id}"


def rate_limit(key_id: str) -> str:
    """String: the GCRA theoretical arrival time of an API key's next call, in
    microseconds on Redis's clock, expiring once it is in the past."""
    return f"rate:{key_id}"


def auth_failures(address: str) -> str:
    """String: as ``rate_limit``, for failed authentications from one client address."""
    return f"auth_fail:{address}"


def key_orders(owner: str) -> str:
    """Stream: one entry (``id`` = order id) per order an API key created, in creation
    order; its entry ids are the cursors of GET /api/orders."""
    return f"key_orders:{owner}"
