"""The venue contract: what the order driver asks of a place to swap tokens.

A venue quotes a swap, accepts a transaction and answers "did it land?" for a
tx_hash. The router and the order driver (engine.execution) talk to venues through
``Venue`` only; each implementation (engine.execution.venues.simulated, and real
adapters) passes the contract suite in tests/venue_contract.py. Every amount that
crosses it is an integer in base units (engine.core.amounts), as on a chain.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from decimal import Decimal
from typing import Protocol

from engine.core import amounts


class VenueError(Exception):
    """Something a venue refused or could not do."""


class TransientVenueError(VenueError):
    """The venue did not answer (outage, timeout, rate limit): trying again may work."""


class RejectedSwapError(VenueError):
    """The venue will never accept this swap as asked: retrying cannot help."""


class UnsupportedPairError(RejectedSwapError):
    """The venue has no pool for this pair of tokens."""


@dataclasses.dataclass(frozen=True)
class Quote:
    """What a venue would pay now for ``amount_in`` base units of ``token_in``."""

    venue: str
    token_in: str
    token_out: str
    amount_in: int  # base units of token_in
    # Base units of token_out, net of the venue's fee and of the price impact of
    # this size on the pool; at least 1 (a swap that pays nothing is refused).
    amount_out: int
    fee: Decimal  # fraction of amount_in kept by the pool
    price_impact: Decimal  # fraction lost to the pool's curve, against its mid price
    quoted_at: float  # epoch seconds, on the venue's clock

    @property
    def price(self) -> Decimal:
        """token_out per token_in in whole tokens, after fees and price impact
        (engine.core.amounts.price: 10 significant digits)."""
        return amounts.price(
            self.amount_in, amounts.token(self.token_in), self.amount_out, amounts.token(self.token_out)
        )


@dataclasses.dataclass(frozen=True)
class SwapTx:
    """A swap transaction, ready to send. Its hash is a pure function of its content."""

    tx_hash: str
    order_id: str
    venue: str
    token_in: str
    token_out: str
    amount_in: int  # base units of token_in
    # Base units of token_out: the transaction reverts rather than pay less.
    min_amount_out: int

    @classmethod
    def build(
        cls,
        order_id: str,
        venue: str,
        token_in: str,
        token_out: str,
        amount_in: int,
        min_amount_out: int,
    ) -> SwapTx:
        """The transaction for an order; the same inputs always give the same tx_hash."""
        return cls(
            tx_hash=tx_hash_for(order_id, venue, token_in, token_out, amount_in, min_amount_out),
            order_id=order_id,
            venue=venue,
            token_in=token_in,
            token_out=token_out,
            amount_in=amount_in,
            min_amount_out=min_amount_out,
        )


def tx_hash_for(
    order_id: str,
    venue: str,
    token_in: str,
    token_out: str,
    amount_in: int,
    min_amount_out: int,
) -> str:
    """``0x`` + 64 lowercase hex digits, deterministic in the transaction's content
    (amounts in base units).

    Deterministic so that a worker resuming an order after a crash rebuilds the very
    transaction the first worker may already have sent, and the ledger dedupes it.
    """
    material = "|".join(
        ("swap-v2", order_id, venue, token_in, token_out, str(amount_in), str(min_amount_out))
    )
    return "0x" + hashlib.sha256(material.encode()).hexdigest()


class TxState(enum.StrEnum):
    PENDING = "pending"  # sent, not yet executed
    CONFIRMED = "confirmed"
    REVERTED = "reverted"
    UNKNOWN = "unknown"  # the venue never received this transaction


@dataclasses.dataclass(frozen=True)
class TxStatus:
    """What a venue knows about a transaction."""

    state: TxState
    # Base units of token_out. CONFIRMED: what was received. REVERTED for slippage:
    # what the swap would have paid when it executed (so the caller can say by how
    # much the price moved).
    amount_out: int | None = None
    # REVERTED: a short machine-readable cause, e.g. SLIPPAGE.
    reason: str | None = None


SLIPPAGE = "slippage"


class Venue(Protocol):
    """A place to swap tokens. Implementations must make ``send`` idempotent by tx_hash."""

    @property
    def name(self) -> str: ...

    async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        """A quote for ``amount_in`` base units of ``token_in``. Raise
        TransientVenueError, or RejectedSwapError for a swap it cannot do (one that
        would pay less than one base unit of ``token_out`` included)."""
        ...

    async def send(self, tx: SwapTx) -> str:
        """Submit ``tx``; sending one already received is a no-op. Returns its tx_hash."""
        ...

    async def status(self, tx_hash: str) -> TxStatus:
        """Where ``tx_hash`` stands; UNKNOWN if the venue never received it."""
        ...
