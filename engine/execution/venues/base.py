"""The venue contract: what the order driver asks of a place to swap tokens.

A venue quotes a swap, builds its transaction (recorded on the order before it is
sent), broadcasts it, and answers "did it land?" for it. The router and the order driver (engine.execution) talk to venues through
``Venue`` only; each implementation (engine.execution.venues.simulated, and real
adapters) passes the contract suite in tests/venue_contract.py. Every amount that
crosses it is an integer in base units (engine.core.amounts), as on a chain.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, Protocol

from engine.core import amounts
from engine.core.store import Recorded


class VenueError(Exception):
    """Something a venue refused or could not do."""


class TransientVenueError(VenueError):
    """The venue did not answer (outage, timeout, rate limit): trying again may work."""


class UnderpricedError(TransientVenueError):
    """The venue will not take the transaction at its fees now (below the chain's
    base fee, or too little to replace what it holds): a faster one may be taken."""


class RejectedSwapError(VenueError):
    """The venue will never accept this swap as asked: retrying cannot help."""


class UnsupportedPairError(RejectedSwapError):
    """The venue has no pool for this pair of tokens."""


class SlippageExceededError(RejectedSwapError):
    """Simulated before sending, the swap would revert because the pool now pays less
    than its ``min_amount_out``: nothing was sent, nothing was spent."""

    def __init__(self, message: str, amount_out: int) -> None:
        super().__init__(message)
        self.amount_out = amount_out  # base units of token_out the swap would pay now


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
class SwapRequest:
    """One order's swap as the driver asks a venue to build it: sell exactly
    ``amount_in`` base units of ``token_in``, revert rather than receive fewer than
    ``min_amount_out`` base units of ``token_out`` (Uniswap V2 Router02's
    ``swapExactTokensForTokens(amountIn, amountOutMin, ...)``)."""

    order_id: str
    venue: str
    token_in: str
    token_out: str
    amount_in: int  # base units of token_in
    min_amount_out: int  # base units of token_out


@dataclasses.dataclass(frozen=True)
class NonceClaim:
    """The account sequence number a transaction uses (EIP-155's ``nonce``), and the
    Redis key that holds the account's next free one. OrderStore.record_tx takes the
    nonce in the same atomic step that records the transaction, so no two recorded
    transactions share a nonce, and a nonce is only used up by a transaction that is
    recorded (hence sent, or resent by whoever resumes its order)."""

    key: str
    nonce: int
    ledger: str  # the account's ledger of signed transactions by nonce (keys.wallet_txs)


@dataclasses.dataclass(frozen=True)
class SwapTx:
    """A swap transaction, signed and ready to broadcast, as recorded on its order
    before it is sent (``record`` / ``from_record``): a worker that resumes the order
    sends these very bytes again, and never builds a second transaction for it."""

    tx_hash: str  # "0x" + 64 hex digits
    order_id: str
    venue: str
    token_in: str
    token_out: str
    amount_in: int  # base units of token_in
    # Base units of token_out: the transaction reverts rather than pay less.
    min_amount_out: int
    # What ``send`` broadcasts: an EVM venue's signed transaction ("0x" + hex of its
    # EIP-2718 encoding); empty for a venue whose transactions are the fields above.
    raw: str = ""
    nonce: NonceClaim | None = None
    # Anything else the venue needs to read the outcome (JSON-able strings), kept
    # sorted by name, so that a transaction equals itself read back from its record.
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", tuple(sorted(self.extra)))

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
        """A transaction whose hash is a pure function of its content (the simulated
        venues' kind): the same inputs always give the same tx_hash."""
        return cls(
            tx_hash=tx_hash_for(order_id, venue, token_in, token_out, amount_in, min_amount_out),
            order_id=order_id,
            venue=venue,
            token_in=token_in,
            token_out=token_out,
            amount_in=amount_in,
            min_amount_out=min_amount_out,
        )

    @classmethod
    def for_swap(cls, swap: SwapRequest, tx_hash: str, **fields: Any) -> SwapTx:
        """The transaction with hash ``tx_hash`` that carries out ``swap``."""
        return cls(tx_hash=tx_hash, **dataclasses.asdict(swap), **fields)

    def record(self) -> str:
        """The JSON text stored on the order (the ``tx`` field of its hash)."""
        data: dict[str, Any] = dataclasses.asdict(self)
        data["extra"] = dict(self.extra)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_record(cls, text: str) -> SwapTx:
        """The transaction ``record`` stored; raise ValueError if it is not one."""
        try:
            data = json.loads(text)
            nonce = data.pop("nonce")
            extra = data.pop("extra")
            return cls(
                **data,
                nonce=NonceClaim(**nonce) if nonce is not None else None,
                extra=tuple(sorted(extra.items())),
            )
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a recorded transaction: {exc!r}") from None

    def get(self, name: str) -> str:
        """One of the ``extra`` values; KeyError if absent."""
        return dict(self.extra)[name]


def tx_hash_for(
    order_id: str,
    venue: str,
    token_in: str,
    token_out: str,
    amount_in: int,
    min_amount_out: int,
) -> str:
    """``0x`` + 64 lowercase hex digits, deterministic in the transaction's content
    (amounts in base units): the simulated venues' transaction ids."""
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
    # PENDING: executed, but not yet final (a receipt fewer than CONFIRMATIONS blocks
    # deep): waiting, not stuck.
    included: bool = False


SLIPPAGE = "slippage"


# Records a built transaction on its order (OrderStore.record_tx, atomically with
# its nonce): what the driver passes to Venue.build.
RecordTx = Callable[[SwapTx], Awaitable[Recorded]]


class Venue(Protocol):
    """A place to swap tokens.

    The driver asks ``build`` for a transaction, records it on the order
    (OrderStore.record_tx, with its ``nonce`` if it has one), then ``send``s it, and
    after a crash ``send``s the recorded one again: ``send`` must be idempotent for a
    transaction already received or executed."""

    @property
    def name(self) -> str: ...

    async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        """A quote for ``amount_in`` base units of ``token_in``. Raise
        TransientVenueError, or RejectedSwapError for a swap it cannot do (one that
        would pay less than one base unit of ``token_out`` included)."""
        ...

    async def build(self, swap: SwapRequest, record: RecordTx) -> SwapTx | None:
        """The transaction for ``swap``, recorded with ``record`` before it is
        returned and not yet sent; None if ``record`` answered NOT_BUILDING (the
        order must not send anything of its own). A venue whose transactions take
        nonces builds again with the next free one while ``record`` answers
        NONCE_TAKEN (another order took it). A venue that can simulate the swap
        first does (pre-flight) and raises SlippageExceededError if it would
        revert for slippage; TransientVenueError or RejectedSwapError otherwise."""
        ...

    async def send(self, tx: SwapTx) -> str:
        """Broadcast ``tx``; sending one already received is a no-op. Returns its tx_hash."""
        ...

    async def speed_up(self, tx: SwapTx, record: RecordTx) -> SwapTx | None:
        """A replacement for ``tx``, sent and still not executed after a while: the
        same swap with the same nonce and higher fees, recorded with ``record`` before
        it is returned (not yet sent); None if the venue has nothing faster to offer
        (no fees to raise, or at their cap) or ``record`` refused it."""
        ...

    async def status(self, tx: SwapTx) -> TxStatus:
        """Where ``tx`` stands; UNKNOWN if the venue never received it."""
        ...
