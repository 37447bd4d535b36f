"""The order's model: its statuses and the moves between them, and the order as stored.

``OrderStatus`` and ``ALLOWED`` are the state machine; the Lua transition script is
generated from ``ALLOWED`` (engine.core.store), so Redis itself refuses a move that is not
here. ``Order`` is an order hash, typed; ``OrderRequest`` its request, typed, with the
amount in base units (engine.core.amounts).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from engine.core import amounts, strict_json
from engine.core.amounts import Token


class OrderStatus(enum.StrEnum):
    """Where an order stands. The value is what every message and the API show."""

    PENDING = "pending"
    """Accepted and queued: the 202 has been answered."""
    ROUTING = "routing"
    """A worker is asking every venue for a quote."""
    BUILDING = "building"
    """The best venue is chosen; the transaction is being built (and recorded)."""
    SUBMITTED = "submitted"
    """The transaction is out (``tx_hash``)."""
    CONFIRMED = "confirmed"
    """Executed: ``execution_price`` and ``amount_out`` are known. Terminal."""
    FAILED = "failed"
    """Not executed, with a ``reason``. Terminal."""

    @property
    def terminal(self) -> bool:
        """Whether no move leaves this status."""
        return self in TERMINAL


# The order a successful order goes through its statuses.
HAPPY_PATH = (
    OrderStatus.PENDING,
    OrderStatus.ROUTING,
    OrderStatus.BUILDING,
    OrderStatus.SUBMITTED,
    OrderStatus.CONFIRMED,
)
TERMINAL = frozenset({OrderStatus.CONFIRMED, OrderStatus.FAILED})
# The only moves an order can make. Anything else (a replay, a retry, a second worker
# racing the first) is refused by the transition script.
ALLOWED: Mapping[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset({OrderStatus.ROUTING, OrderStatus.FAILED}),
    OrderStatus.ROUTING: frozenset({OrderStatus.BUILDING, OrderStatus.FAILED}),
    OrderStatus.BUILDING: frozenset({OrderStatus.SUBMITTED, OrderStatus.FAILED}),
    OrderStatus.SUBMITTED: frozenset({OrderStatus.CONFIRMED, OrderStatus.FAILED}),
    OrderStatus.CONFIRMED: frozenset(),
    OrderStatus.FAILED: frozenset(),
}


class InvalidOrderError(Exception):
    """The stored order request cannot be executed; the order fails without a retry."""


@dataclasses.dataclass(frozen=True)
class OrderRequest:
    """An order's request, typed and exact."""

    token_in: Token
    token_out: Token
    amount_in: int  # base units of token_in
    max_slippage: Decimal  # a fraction: 0.01 is 1%

    @classmethod
    def parse(cls, text: str) -> OrderRequest:
        """An order's stored request (canonical JSON text); raise InvalidOrderError.
        Cached: a request never changes, and an order's steps read it several times."""
        return _parse_request(text)


@functools.lru_cache(maxsize=4096)
def _parse_request(text: str) -> OrderRequest:
    try:
        data = strict_json.loads(text)
        request = OrderRequest(
            token_in=amounts.token(data["token_in"]),
            token_out=amounts.token(data["token_out"]),
            amount_in=amounts.token(data["token_in"]).to_base_units(data["amount"]),
            max_slippage=Decimal(data["max_slippage"]),
        )
    except amounts.AmountError as exc:
        raise InvalidOrderError(f"The order amount cannot be traded: {exc}") from None
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
        raise InvalidOrderError(f"The order request is unreadable ({exc!r})") from None
    if request.amount_in <= 0:
        raise InvalidOrderError("The order amount must be a positive number")
    if not 0 < request.max_slippage < 1:
        raise InvalidOrderError("max_slippage must be between 0 and 1")
    return request


# Hash fields that hold exact numbers (JSON number text).
_NUMBER_FIELDS = frozenset(
    {"quoted_price", "expected_amount_out", "min_amount_out", "execution_price", "amount_out"}
)


@dataclasses.dataclass(frozen=True)
class Order:
    """An order as its hash (``keys.order``) stores it, typed. Amounts are whole
    tokens (``Decimal``, exact); times are epoch seconds."""

    id: str
    status: OrderStatus
    request: str  # the canonical JSON text of the validated request
    created_at: float
    updated_at: float
    seq: int = 1
    attempts: int = 0
    venue: str | None = None
    quoted_price: Decimal | None = None
    expected_amount_out: Decimal | None = None
    min_amount_out: Decimal | None = None
    tx_hash: str | None = None
    # The recorded transaction (a venue's SwapTx.record(): what resending it takes).
    tx: str | None = None
    # Transactions it replaced (same nonce, lower fees; any may still be mined): a JSON
    # list of their records. And every tx_hash the order broadcast, in order.
    tx_prior: str | None = None
    tx_hashes: tuple[str, ...] | None = None
    execution_price: Decimal | None = None
    amount_out: Decimal | None = None
    reason: str | None = None
    # The id of the API key that created it (engine.core.accounts.ANONYMOUS with
    # AUTH=off); None for an order made before accounts existed, which no key owns.
    owner: str | None = None

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> Order:
        """The order in a hash as Redis returns it (every value a string). Raises
        KeyError for a hash without ``id``, ``status`` or ``request``, ValueError for
        an unknown status."""
        values: dict[str, Any] = {
            "id": fields["id"],
            "status": OrderStatus(fields["status"]),
            "request": fields["request"],
            "created_at": float(fields.get("created_at", 0)),
            "updated_at": float(fields.get("updated_at", 0)),
            "seq": int(fields.get("seq", 1)),
            "attempts": int(fields.get("attempts") or 0),
        }
        for name in ("venue", "tx_hash", "tx", "tx_prior", "reason", "owner"):
            if name in fields:
                values[name] = fields[name]
        if "tx_hashes" in fields:
            values["tx_hashes"] = tuple(json.loads(fields["tx_hashes"]))
        for name in _NUMBER_FIELDS:
            if name in fields:
                values[name] = Decimal(fields[name])
        return cls(**values)

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def parsed_request(self) -> OrderRequest:
        """The request, typed (OrderRequest.parse); raise InvalidOrderError."""
        return OrderRequest.parse(self.request)

    def moved(self, status: OrderStatus, fields: Mapping[str, Any]) -> Order:
        """This order after a transition to ``status`` that stored ``fields`` (``None``
        values are not stored)."""
        return dataclasses.replace(
            self, status=status, **{k: v for k, v in fields.items() if v is not None}
        )
