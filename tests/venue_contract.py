"""The Venue contract: tests every venue implementation runs (engine.execution.venues.base).

A test module subclasses ``VenueContract`` (its name does not start with ``Test``, so
pytest collects only the subclasses) and provides three hooks: the venue, a way to
let the venue's pending transactions execute, and a way to move the market. The
simulated venues pass it (tests/test_venue_contract.py); a real adapter must too.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from redis.asyncio import Redis

from engine.core.store import CLAIM_NONCE_LUA, Recorded
from engine.execution.venues.base import (
    SLIPPAGE,
    SlippageExceededError,
    SwapRequest,
    SwapTx,
    TxState,
    Venue,
)


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

    def swap_for(self, venue: Venue, amount_in: int, min_amount_out: int) -> SwapRequest:
        return SwapRequest(f"contract-{secrets.token_hex(4)}", venue.name, self.TOKEN_IN,
                           self.TOKEN_OUT, amount_in, min_amount_out)

    @pytest.fixture(autouse=True)
    def _records(self, redis: Redis) -> None:
        """Record as OrderStore.record_tx does, without an order: the nonce rule
        (engine.core.store), the same script."""
        claim = redis.register_script(CLAIM_NONCE_LUA)
        self.recorded: list[SwapTx] = []

        async def record(tx: SwapTx) -> Recorded:
            if tx.nonce is not None:
                outcome = Recorded(int(await claim(keys=[tx.nonce.key, tx.nonce.key, tx.nonce.ledger],
                                                   args=["", "", tx.nonce.nonce, tx.raw])))
                if outcome is not Recorded.RECORDED:
                    return outcome
            self.recorded.append(SwapTx.from_record(tx.record()))
            return Recorded.RECORDED

        self.record = record

    async def tx_for(self, venue: Venue, amount_in: int, min_amount_out: int) -> SwapTx:
        """A built transaction, recorded and read back as the driver does (what a
        resumed order sends is what its record holds)."""
        tx = await venue.build(self.swap_for(venue, amount_in, min_amount_out), self.record)
        assert tx is not None and tx in self.recorded  # (as read back from its record)
        return self.recorded[self.recorded.index(tx)]

    async def test_building_records_before_it_returns_and_not_after_a_refusal(
        self, venue: Venue
    ) -> None:
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        swap = self.swap_for(venue, self.SMALL, quote.amount_out * 99 // 100)
        seen: list[SwapTx] = []

        async def refused(tx: SwapTx) -> Recorded:
            seen.append(tx)
            return Recorded.NOT_BUILDING  # a cancel came first

        assert await venue.build(swap, refused) is None
        assert len(seen) == 1 and (await venue.status(seen[0])).state is TxState.UNKNOWN
        # Two orders built at once never get one nonce (a venue without nonces: two
        # different transactions).
        first, second = await asyncio.gather(
            self.tx_for(venue, self.SMALL, 1), self.tx_for(venue, self.SMALL, 1)
        )
        assert first.tx_hash != second.tx_hash
        if first.nonce is not None:  # consecutive: neither shared nor a gap between them
            assert second.nonce is not None
            assert abs(first.nonce.nonce - second.nonce.nonce) == 1

    async def test_a_quote_is_in_base_units_and_grows_worse_with_size(self, venue: Venue) -> None:
        small = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        large = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.LARGE)
        assert (small.venue, small.amount_in, large.amount_in) == (venue.name, self.SMALL, self.LARGE)
        assert isinstance(small.amount_out, int) and small.amount_out >= 1
        # Price impact: per unit sold, the larger swap pays less.
        assert large.amount_out * self.SMALL < small.amount_out * self.LARGE
        assert small.price > large.price

    async def test_a_transaction_never_sent_is_unknown(self, venue: Venue) -> None:
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        tx = await self.tx_for(venue, self.SMALL, quote.amount_out * 99 // 100)
        assert tx.tx_hash.startswith("0x") and len(tx.tx_hash) == 66
        assert (await venue.status(tx)).state is TxState.UNKNOWN
        await self.settle(venue)
        assert (await venue.status(tx)).state is TxState.UNKNOWN

    async def test_the_pre_flight_refuses_a_swap_the_price_already_moved_past(
        self, venue: Venue
    ) -> None:
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        await self.move_price(venue, 0.97)
        await self.settle(venue)
        with pytest.raises(SlippageExceededError) as refused:
            await venue.build(self.swap_for(venue, self.SMALL, quote.amount_out * 99 // 100), self.record)
        # What it would pay now, so the driver can say by how much the price moved.
        assert 0 < refused.value.amount_out < quote.amount_out * 99 // 100

    async def test_sending_twice_executes_once(self, venue: Venue) -> None:
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        tx = await self.tx_for(venue, self.SMALL, quote.amount_out * 99 // 100)
        assert await venue.send(tx) == tx.tx_hash
        assert await venue.send(tx) == tx.tx_hash  # the same transaction: a no-op
        assert (await venue.status(tx)).state in (TxState.PENDING, TxState.CONFIRMED)
        await self.settle(venue)
        assert await venue.send(tx) == tx.tx_hash  # resent after it executed: a no-op
        await self.settle(venue)
        confirmed = await venue.status(tx)
        assert confirmed.state is TxState.CONFIRMED
        assert confirmed.amount_out is not None and confirmed.amount_out >= tx.min_amount_out
        # Asked again (another worker, a resumed order): the same one outcome.
        assert await venue.status(tx) == confirmed
        await self.assert_executed_once(venue, tx, confirmed.amount_out)

    async def assert_executed_once(self, venue: Venue, tx: SwapTx, amount_out: int) -> None:
        """A venue with a ledger of its own (a chain's balances) checks it here."""

    async def test_a_price_move_past_min_amount_out_is_a_slippage_revert(self, venue: Venue) -> None:
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        tx = await self.tx_for(venue, self.SMALL, quote.amount_out * 99 // 100)  # 1% slippage
        await venue.send(tx)
        await self.move_price(venue, 0.97)  # after the send, before it executes
        await self.settle(venue)
        reverted = await venue.status(tx)
        assert reverted.state is TxState.REVERTED and reverted.reason == SLIPPAGE
        # What it would have paid, so the driver can say by how much the price moved.
        assert reverted.amount_out is not None and reverted.amount_out < tx.min_amount_out
