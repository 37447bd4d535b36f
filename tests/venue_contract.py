"""The Venue contract: tests every venue implementation runs (engine.execution.venues.base).

A test module subclasses ``VenueContract`` (its name does not start with ``Test``, so
pytest collects only the subclasses) and provides three hooks: the venue, a way to
let the venue's pending transactions execute, and a way to move the market. The
simulated venues pass it (tests/test_venue_contract.py); a real adapter must too.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from engine.execution.venues.base import SLIPPAGE, SwapTx, TxState, Venue


class VenueContract:
    """What the order driver relies on of a venue."""

    # A pair the venue trades and two sizes of token_in (base units), the second
    # large enough to move the pool's price.
    TOKEN_IN = "SOL"
    TOKEN_OUT = "USDC"
    SMALL = 1_000_000_000  # 1 SOL
    LARGE = 100_000_000_000_000  # 100,000 SOL

    @pytest.fixture
    def venue(self, *args: Any) -> Venue:
        raise NotImplementedError("a subclass provides the venue under test")

    async def settle(self, venue: Venue) -> None:
        """Let every transaction sent to ``venue`` so far execute."""
        raise NotImplementedError

    async def move_price(self, venue: Venue, factor: float) -> None:
        """From now on, ``TOKEN_IN`` is worth ``factor`` times what it was."""
        raise NotImplementedError

    def tx_for(self, venue: Venue, amount_in: int, min_amount_out: int) -> SwapTx:
        return SwapTx.build(f"contract-{secrets.token_hex(4)}", venue.name, self.TOKEN_IN,
                            self.TOKEN_OUT, amount_in, min_amount_out)

    async def test_a_quote_is_in_base_units_and_grows_worse_with_size(self, venue: Venue) -> None:
        small = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        large = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.LARGE)
        assert (small.venue, small.amount_in, large.amount_in) == (venue.name, self.SMALL, self.LARGE)
        assert isinstance(small.amount_out, int) and small.amount_out >= 1
        # Price impact: per unit sold, the larger swap pays less.
        assert large.amount_out * self.SMALL < small.amount_out * self.LARGE
        assert small.price > large.price

    async def test_a_hash_never_sent_is_unknown(self, venue: Venue) -> None:
        status = await venue.status("0x" + secrets.token_hex(32))
        assert status.state is TxState.UNKNOWN

    async def test_sending_twice_executes_once(self, venue: Venue) -> None:
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        tx = self.tx_for(venue, self.SMALL, quote.amount_out * 99 // 100)
        assert await venue.send(tx) == tx.tx_hash
        assert await venue.send(tx) == tx.tx_hash  # the same transaction: a no-op
        assert (await venue.status(tx.tx_hash)).state in (TxState.PENDING, TxState.CONFIRMED)
        await self.settle(venue)
        confirmed = await venue.status(tx.tx_hash)
        assert confirmed.state is TxState.CONFIRMED
        assert confirmed.amount_out is not None and confirmed.amount_out >= tx.min_amount_out
        # Asked again (another worker, a resumed order): the same one outcome.
        assert await venue.status(tx.tx_hash) == confirmed

    async def test_a_price_move_past_min_amount_out_is_a_slippage_revert(self, venue: Venue) -> None:
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        tx = self.tx_for(venue, self.SMALL, quote.amount_out * 99 // 100)  # 1% slippage
        await venue.send(tx)
        await self.move_price(venue, 0.97)  # after the send, before it executes
        await self.settle(venue)
        reverted = await venue.status(tx.tx_hash)
        assert reverted.state is TxState.REVERTED and reverted.reason == SLIPPAGE
        # What it would have paid, so the driver can say by how much the price moved.
        assert reverted.amount_out is not None and reverted.amount_out < tx.min_amount_out
