"""The simulated market, the venues' ledger and the router, against a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
from decimal import Decimal
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from engine.core import keys
from engine.core.amounts import token
from engine.core.config import Config
from engine.execution.router import Router
from engine.execution.venues.base import (
    Quote,
    RejectedSwapError,
    SwapRequest,
    SwapTx,
    TransientVenueError,
    TxState,
    TxStatus,
    UnsupportedPairError,
    tx_hash_for,
)
from engine.execution.venues.market import (
    DEFAULT_PROFILES,
    METEORA,
    PAIR_DEPTH_USD,
    RAYDIUM,
    REFERENCE_PRICES_USD,
    ManualClock,
    Pool,
    SimulatedMarket,
    pair_key,
)
from engine.execution.venues.simulated import SimulatedVenue, make_simulated_venues
from engine.web.schemas import Schemas

TX_HASH = re.compile(r"^0x[0-9a-f]{64}$")
SOL, USDC = token("SOL"), token("USDC")


def sol(amount: str | int) -> int:
    """Whole SOL (exact, as text) in lamports."""
    return SOL.to_base_units(Decimal(amount))


def test_reference_tokens_are_the_schema_tokens(schemas: Schemas) -> None:
    assert set(REFERENCE_PRICES_USD) == set(schemas.tokens())


def test_every_pair_of_schema_tokens_has_a_pool(schemas: Schemas) -> None:
    pairs = {pair_key(a, b) for a, b in itertools.combinations(schemas.tokens(), 2)}
    assert pairs == set(PAIR_DEPTH_USD)
    # Every schema-valid order can be routed somewhere.
    for a, b in itertools.permutations(schemas.tokens(), 2):
        assert any(p.supports(a, b) for p in DEFAULT_PROFILES), (a, b)


def test_reference_prices_are_a_deterministic_walk() -> None:
    t = 1_700_000_000.0
    one, same, other = SimulatedMarket(7), SimulatedMarket(7), SimulatedMarket(8)
    assert one.reference_price("SOL", t) == same.reference_price("SOL", t)
    assert one.reference_price("SOL", t) != other.reference_price("SOL", t)
    # It moves with time, but stays a realistic SOL price.
    prices = [one.reference_price("SOL", t + i) for i in range(0, 600, 60)]
    assert len(set(prices)) > 1
    assert all(180 < p < 260 for p in prices)
    assert one.reference_price("USDC", t) == 1.0
    assert 0.95 < one.reference_price("USDT", t) < 1.05


def test_walk_stepped_from_a_cached_bucket_equals_the_walk_summed_afresh() -> None:
    t = 1_700_000_000.0
    stepped = SimulatedMarket(3)
    stepped.reference_price("BONK", t)
    stepped.reference_price("BONK", t + 17)  # computed from the cached bucket at t
    stepped.reference_price("BONK", t - 5)
    for at in (t, t + 17, t - 5):
        assert stepped.reference_price("BONK", at) == SimulatedMarket(3).reference_price("BONK", at)


def test_shock_moves_a_price_from_a_given_time() -> None:
    market = SimulatedMarket(1, ManualClock(1_700_000_000.0), volatility=0)
    market.shock("SOL", 0.9, from_time=1_700_000_010.0)
    assert market.reference_price("SOL", 1_700_000_009.0) == 220.0
    assert market.reference_price("SOL", 1_700_000_010.0) == pytest.approx(198.0)


def _venues(
    redis: Redis, config: Config, clock: ManualClock, **market_args: float
) -> dict[str, SimulatedVenue]:
    market = SimulatedMarket(config.price_seed, clock, **market_args)
    return make_simulated_venues(redis, config, market)


async def test_sol_usdc_quotes_near_the_reference_price(redis: Redis, config: Config) -> None:
    venues = _venues(redis, config, ManualClock(), volatility=0)
    for venue in venues.values():
        quote = await venue.quote("SOL", "USDC", sol("12.5"))
        assert quote.venue == venue.name
        assert isinstance(quote.amount_out, int) and quote.amount_in == 12_500_000_000
        # 220 less at most 0.55% fee, 0.15% venue offset and a little price impact.
        assert 218 < quote.price < Decimal("220.4")
        assert isinstance(quote.price, Decimal) and len(quote.price.as_tuple().digits) <= 10
        assert 0 < quote.fee < Decimal("0.01")
    reverse = await venues["raydium"].quote("USDC", "SOL", USDC.to_base_units(220))
    assert sol("0.97") < reverse.amount_out < sol(1)


async def test_price_impact_grows_with_size(redis: Redis, config: Config) -> None:
    venue = _venues(redis, config, ManualClock())["meteora"]
    small, medium, large = [await venue.quote("SOL", "USDC", sol(a)) for a in (1, 1_000, 100_000)]
    assert small.price > medium.price > large.price
    assert small.price_impact < medium.price_impact < large.price_impact
    assert large.price_impact > 0.5  # 100k SOL is most of the pool


async def test_the_best_venue_changes_over_time(redis: Redis, config: Config) -> None:
    clock = ManualClock()
    router = Router(_venues(redis, config, clock))
    winners = set()
    for _ in range(40):
        winners.add((await router.best_quote("SOL", "USDC", sol(10))).venue)
        clock.advance(5)
    assert winners == {"raydium", "meteora"}


async def test_unsupported_pair_and_bad_amounts_are_refused(redis: Redis, config: Config) -> None:
    meteora = _venues(redis, config, ManualClock())["meteora"]
    assert not METEORA.supports("BONK", "RAY") and RAYDIUM.supports("BONK", "RAY")
    with pytest.raises(UnsupportedPairError):
        await meteora.quote("BONK", "RAY", 100_000)
    with pytest.raises(UnsupportedPairError):
        await meteora.quote("SOL", "SOL", sol(1))
    for bad in (0, -1, 1.5, float("nan"), Decimal("1.5"), True):
        with pytest.raises(RejectedSwapError):
            await meteora.quote("SOL", "USDC", bad)  # type: ignore[arg-type]


async def test_a_swap_that_buys_less_than_one_unit_is_refused(redis: Redis, config: Config) -> None:
    # 1 lamport is ~2.2e-7 USDC, below USDC's smallest unit (1e-6): no trade.
    venue = _venues(redis, config, ManualClock(), volatility=0)["raydium"]
    with pytest.raises(RejectedSwapError, match=r"less than the smallest unit of USDC \(0\.000001\)"):
        await venue.quote("SOL", "USDC", 1)
    assert (await venue.quote("SOL", "USDC", 10_000)).amount_out >= 1


def test_pool_swaps_like_uniswap_v2_get_amount_out() -> None:
    # UniswapV2Library.getAmountOut(100, 1000, 1000) with its 0.3% fee: 99700 * 1000
    # / (1000 * 1000 + 99700) = 90.66..., rounded down.
    assert Pool(reserve_in=1000, reserve_out=1000, fee_ppm=3000).amount_out(100) == 90
    big = Pool(reserve_in=10**30, reserve_out=3 * 10**30, fee_ppm=2500)
    amount_in = 10**27 + 7
    expected = amount_in * 997_500 * 3 * 10**30 // (10**30 * 10**6 + amount_in * 997_500)
    assert big.amount_out(amount_in) == expected  # exact at any size: integers


def test_tx_hash_is_deterministic_and_well_formed() -> None:
    args = ("order-1", "raydium", "SOL", "USDC", 12_500_000_000, 2_700_000_000)
    assert TX_HASH.match(tx_hash_for(*args))
    assert tx_hash_for(*args) == tx_hash_for(*args)
    assert tx_hash_for(*args) != tx_hash_for("order-1", "meteora", "SOL", "USDC", *args[4:])
    assert tx_hash_for(*args) != tx_hash_for(*args[:5], 2_700_000_001)
    assert SwapTx.build(*args).tx_hash == tx_hash_for(*args)


async def _ledger(redis: Redis, tx_hash: str) -> dict[str, str]:
    return cast("dict[str, str]", await redis.hgetall(keys.ledger(tx_hash)))


async def test_sending_twice_records_and_executes_once(redis: Redis, config: Config) -> None:
    clock = ManualClock()
    slow = dataclasses.replace(config, confirm_latency_min_ms=1000, confirm_latency_max_ms=1000)
    venue = _venues(redis, slow, clock)["raydium"]
    quote = await venue.quote("SOL", "USDC", sol(2))
    tx = SwapTx.build("order-1", "raydium", "SOL", "USDC", sol(2), quote.amount_out * 99 // 100)

    assert await venue.status(tx) == TxStatus(TxState.UNKNOWN)
    assert await venue.send(tx) == tx.tx_hash
    assert await venue.send(tx) == tx.tx_hash
    assert (await venue.status(tx)).state is TxState.PENDING
    assert len(await redis.keys(keys.ledger("*"))) == 1
    assert (await _ledger(redis, tx.tx_hash))["duplicate_sends"] == "1"

    clock.advance(1.0)
    confirmed = await venue.status(tx)
    assert confirmed.state is TxState.CONFIRMED
    assert confirmed.amount_out is not None and confirmed.amount_out >= tx.min_amount_out
    assert isinstance(confirmed.amount_out, int)

    # Another process (its own market object, its own shocks) reads the same outcome.
    other = _venues(redis, slow, clock)["raydium"]
    other.market.shock("SOL", 0.5)
    assert await other.status(tx) == confirmed
    # A venue does not answer for another venue's transactions.
    assert (await _venues(redis, slow, clock)["meteora"].status(tx)).state is TxState.UNKNOWN


async def test_a_price_move_past_min_amount_out_reverts(redis: Redis, config: Config) -> None:
    clock = ManualClock()
    slow = dataclasses.replace(config, confirm_latency_min_ms=1000, confirm_latency_max_ms=1000)
    venue = _venues(redis, slow, clock, volatility=0)["meteora"]
    quote = await venue.quote("SOL", "USDC", sol(2))
    tx = SwapTx.build("order-2", "meteora", "SOL", "USDC", sol(2), quote.amount_out * 99 // 100)
    await venue.send(tx)
    venue.market.shock("SOL", 0.98)  # after the send, before it executes
    clock.advance(1.0)
    status = await venue.status(tx)
    assert status.state is TxState.REVERTED
    assert status.reason == "slippage"
    assert status.amount_out is not None
    assert status.amount_out / quote.amount_out == pytest.approx(0.98, abs=1e-4)
    assert (await _ledger(redis, tx.tx_hash))["state"] == "reverted"


async def test_transient_failures_record_nothing(redis: Redis, config: Config) -> None:
    flaky = dataclasses.replace(config, venue_failure_rate=1.0)
    venue = _venues(redis, flaky, ManualClock())["raydium"]
    tx = SwapTx.build("order-3", "raydium", "SOL", "USDC", sol(1), USDC.to_base_units(200))
    with pytest.raises(TransientVenueError):
        await venue.quote("SOL", "USDC", sol(1))
    with pytest.raises(TransientVenueError):
        await venue.send(tx)
    with pytest.raises(TransientVenueError):
        await venue.status(tx)
    assert await redis.keys(keys.ledger("*")) == []


class _StubVenue:
    """A venue that answers quotes from a script: a Quote's amount_out, or an error."""

    def __init__(self, name: str, answer: int | BaseException | None) -> None:
        self.name = name
        self.answer = answer

    async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        if self.answer is None:
            await asyncio.Event().wait()  # never answers
        if isinstance(self.answer, BaseException):
            raise self.answer
        assert isinstance(self.answer, int)
        return Quote(self.name, token_in, token_out, amount_in, self.answer,
                     Decimal("0.0025"), Decimal(0), 0.0)

    async def build(self, swap: SwapRequest, record: Any) -> SwapTx | None:
        raise NotImplementedError

    async def speed_up(self, tx: SwapTx, record: Any) -> SwapTx | None:
        raise NotImplementedError

    async def send(self, tx: SwapTx) -> str:
        raise NotImplementedError

    async def status(self, tx: SwapTx) -> TxStatus:
        raise NotImplementedError


async def test_router_picks_the_best_net_output() -> None:
    router = Router([_StubVenue("a", 219_000_000), _StubVenue("b", 219_000_001), _StubVenue("c", 218)])
    assert (await router.best_quote("SOL", "USDC", sol(1))).venue == "b"  # by one base unit


async def test_router_uses_the_venues_that_answer() -> None:
    router = Router(
        [
            _StubVenue("down", TransientVenueError("down: outage")),
            _StubVenue("slow", None),
            _StubVenue("up", 219_000_000),
        ],
        timeout_secs=0.05,
    )
    assert (await router.best_quote("SOL", "USDC", sol(1))).venue == "up"


async def test_router_asks_every_venue_at_once() -> None:
    # Each venue answers only once every venue has been asked: a router that asked
    # them one after another would wait on the first until the timeout, get nothing
    # from any of them, and fail.
    asked: list[str] = []
    everyone_asked = asyncio.Event()

    class _Rendezvous(_StubVenue):
        async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
            asked.append(self.name)
            if len(asked) == 3:
                everyone_asked.set()
            await everyone_asked.wait()
            return await super().quote(token_in, token_out, amount_in)

    router = Router([_Rendezvous("a", 219), _Rendezvous("b", 220), _Rendezvous("c", 218)],
                    timeout_secs=5.0)
    assert (await router.best_quote("SOL", "USDC", sol(1))).venue == "b"
    assert sorted(asked) == ["a", "b", "c"]


async def test_router_all_venues_down_is_transient() -> None:
    router = Router(
        [_StubVenue("down", TransientVenueError("down: outage")), _StubVenue("slow", None)],
        timeout_secs=0.05,
    )
    with pytest.raises(TransientVenueError, match=r"down: outage; slow: no quote within 0\.05 s"):
        await router.best_quote("SOL", "USDC", sol(1))


async def test_router_pair_nobody_has_is_not_transient() -> None:
    router = Router(
        [
            _StubVenue("a", UnsupportedPairError("a has no pool")),
            _StubVenue("b", UnsupportedPairError("b has no pool")),
        ]
    )
    with pytest.raises(UnsupportedPairError, match="No venue offers a BONK/RAY pool"):
        await router.best_quote("BONK", "RAY", 100_000)
    # One venue down and the other without the pair: the first may have it later.
    router = Router(
        [_StubVenue("a", UnsupportedPairError("no pool")), _StubVenue("b", TransientVenueError("x"))]
    )
    with pytest.raises(TransientVenueError):
        await router.best_quote("BONK", "RAY", 100_000)
