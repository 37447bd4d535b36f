"""The simulated market, the venues' ledger and the router, against a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
from typing import cast

import pytest
from redis.asyncio import Redis

from engine import keys
from engine.config import Config
from engine.router import Router
from engine.schemas import Schemas
from engine.venues import (
    DEFAULT_PROFILES,
    METEORA,
    PAIR_DEPTH_USD,
    RAYDIUM,
    REFERENCE_PRICES_USD,
    ManualClock,
    Quote,
    RejectedSwapError,
    SimulatedMarket,
    SimulatedVenue,
    SwapTx,
    TransientVenueError,
    TxState,
    TxStatus,
    UnsupportedPairError,
    make_simulated_venues,
    pair_key,
    tx_hash_for,
)

TX_HASH = re.compile(r"^0x[0-9a-f]{64}$")


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
        quote = await venue.quote("SOL", "USDC", 12.5)
        assert quote.venue == venue.name
        # 220 less at most 0.55% fee, 0.15% venue offset and a little price impact.
        assert 218 < quote.price < 220.4
        assert 0 < quote.fee < 0.01
    reverse = await venues["raydium"].quote("USDC", "SOL", 220.0)
    assert 0.97 < reverse.amount_out < 1.0


async def test_price_impact_grows_with_size(redis: Redis, config: Config) -> None:
    venue = _venues(redis, config, ManualClock())["meteora"]
    small, medium, large = [await venue.quote("SOL", "USDC", a) for a in (1.0, 1_000.0, 100_000.0)]
    assert small.price > medium.price > large.price
    assert small.price_impact < medium.price_impact < large.price_impact
    assert large.price_impact > 0.5  # 100k SOL is most of the pool


async def test_the_best_venue_changes_over_time(redis: Redis, config: Config) -> None:
    clock = ManualClock()
    router = Router(_venues(redis, config, clock))
    winners = set()
    for _ in range(40):
        winners.add((await router.best_quote("SOL", "USDC", 10.0)).venue)
        clock.advance(5)
    assert winners == {"raydium", "meteora"}


async def test_unsupported_pair_and_bad_amounts_are_refused(redis: Redis, config: Config) -> None:
    meteora = _venues(redis, config, ManualClock())["meteora"]
    assert not METEORA.supports("BONK", "RAY") and RAYDIUM.supports("BONK", "RAY")
    with pytest.raises(UnsupportedPairError):
        await meteora.quote("BONK", "RAY", 1.0)
    with pytest.raises(UnsupportedPairError):
        await meteora.quote("SOL", "SOL", 1.0)
    with pytest.raises(RejectedSwapError):
        await meteora.quote("SOL", "USDC", 0.0)
    with pytest.raises(RejectedSwapError):
        await meteora.quote("SOL", "USDC", float("nan"))


def test_tx_hash_is_deterministic_and_well_formed() -> None:
    args = ("order-1", "raydium", "SOL", "USDC", 12.5, 2700.0)
    assert TX_HASH.match(tx_hash_for(*args))
    assert tx_hash_for(*args) == tx_hash_for(*args)
    assert tx_hash_for(*args) != tx_hash_for("order-1", "meteora", "SOL", "USDC", 12.5, 2700.0)
    assert SwapTx.build(*args).tx_hash == tx_hash_for(*args)


async def _ledger(redis: Redis, tx_hash: str) -> dict[str, str]:
    return cast("dict[str, str]", await redis.hgetall(keys.ledger(tx_hash)))


async def test_sending_twice_records_and_executes_once(redis: Redis, config: Config) -> None:
    clock = ManualClock()
    slow = dataclasses.replace(config, confirm_latency_min_ms=1000, confirm_latency_max_ms=1000)
    venue = _venues(redis, slow, clock)["raydium"]
    quote = await venue.quote("SOL", "USDC", 2.0)
    tx = SwapTx.build("order-1", "raydium", "SOL", "USDC", 2.0, quote.amount_out * 0.99)

    assert await venue.status(tx.tx_hash) == TxStatus(TxState.UNKNOWN)
    assert await venue.send(tx) == tx.tx_hash
    assert await venue.send(tx) == tx.tx_hash
    assert (await venue.status(tx.tx_hash)).state is TxState.PENDING
    assert len(await redis.keys(keys.ledger("*"))) == 1
    assert (await _ledger(redis, tx.tx_hash))["duplicate_sends"] == "1"

    clock.advance(1.0)
    confirmed = await venue.status(tx.tx_hash)
    assert confirmed.state is TxState.CONFIRMED
    assert confirmed.amount_out is not None and confirmed.amount_out >= tx.min_amount_out
    assert confirmed.execution_price == pytest.approx(confirmed.amount_out / 2.0)

    # Another process (its own market object, its own shocks) reads the same outcome.
    other = _venues(redis, slow, clock)["raydium"]
    other.market.shock("SOL", 0.5)
    assert await other.status(tx.tx_hash) == confirmed
    # A venue does not answer for another venue's transactions.
    assert (await _venues(redis, slow, clock)["meteora"].status(tx.tx_hash)).state is TxState.UNKNOWN


async def test_a_price_move_past_min_amount_out_reverts(redis: Redis, config: Config) -> None:
    clock = ManualClock()
    slow = dataclasses.replace(config, confirm_latency_min_ms=1000, confirm_latency_max_ms=1000)
    venue = _venues(redis, slow, clock, volatility=0)["meteora"]
    quote = await venue.quote("SOL", "USDC", 2.0)
    tx = SwapTx.build("order-2", "meteora", "SOL", "USDC", 2.0, quote.amount_out * 0.99)
    await venue.send(tx)
    venue.market.shock("SOL", 0.98)  # after the send, before it executes
    clock.advance(1.0)
    status = await venue.status(tx.tx_hash)
    assert status.state is TxState.REVERTED
    assert status.reason == "slippage"
    assert status.amount_out is not None
    assert status.amount_out / quote.amount_out == pytest.approx(0.98, abs=1e-4)
    assert (await _ledger(redis, tx.tx_hash))["state"] == "reverted"


async def test_transient_failures_record_nothing(redis: Redis, config: Config) -> None:
    flaky = dataclasses.replace(config, venue_failure_rate=1.0)
    venue = _venues(redis, flaky, ManualClock())["raydium"]
    tx = SwapTx.build("order-3", "raydium", "SOL", "USDC", 1.0, 200.0)
    with pytest.raises(TransientVenueError):
        await venue.quote("SOL", "USDC", 1.0)
    with pytest.raises(TransientVenueError):
        await venue.send(tx)
    with pytest.raises(TransientVenueError):
        await venue.status(tx.tx_hash)
    assert await redis.keys(keys.ledger("*")) == []


class _StubVenue:
    """A venue that answers quotes from a script: a Quote's amount_out, or an error."""

    def __init__(self, name: str, answer: float | BaseException | None) -> None:
        self.name = name
        self.answer = answer

    async def quote(self, token_in: str, token_out: str, amount: float) -> Quote:
        if self.answer is None:
            await asyncio.Event().wait()  # never answers
        if isinstance(self.answer, BaseException):
            raise self.answer
        assert isinstance(self.answer, float)
        return Quote(self.name, token_in, token_out, amount, self.answer, 0.0025, 0.0, 0.0)

    async def send(self, tx: SwapTx) -> str:
        raise NotImplementedError

    async def status(self, tx_hash: str) -> TxStatus:
        raise NotImplementedError


async def test_router_picks_the_best_net_output() -> None:
    router = Router([_StubVenue("a", 219.0), _StubVenue("b", 220.5), _StubVenue("c", 218.0)])
    assert (await router.best_quote("SOL", "USDC", 1.0)).venue == "b"


async def test_router_uses_the_venues_that_answer() -> None:
    router = Router(
        [
            _StubVenue("down", TransientVenueError("down: outage")),
            _StubVenue("slow", None),
            _StubVenue("up", 219.0),
        ],
        timeout_secs=0.05,
    )
    assert (await router.best_quote("SOL", "USDC", 1.0)).venue == "up"


async def test_router_asks_every_venue_at_once() -> None:
    # Each venue answers only once every venue has been asked: a router that asked
    # them one after another would wait on the first until the timeout, get nothing
    # from any of them, and fail.
    asked: list[str] = []
    everyone_asked = asyncio.Event()

    class _Rendezvous(_StubVenue):
        async def quote(self, token_in: str, token_out: str, amount: float) -> Quote:
            asked.append(self.name)
            if len(asked) == 3:
                everyone_asked.set()
            await everyone_asked.wait()
            return await super().quote(token_in, token_out, amount)

    router = Router([_Rendezvous("a", 219.0), _Rendezvous("b", 220.5), _Rendezvous("c", 218.0)],
                    timeout_secs=5.0)  # fmt: skip
    assert (await router.best_quote("SOL", "USDC", 1.0)).venue == "b"
    assert sorted(asked) == ["a", "b", "c"]


async def test_router_all_venues_down_is_transient() -> None:
    router = Router(
        [_StubVenue("down", TransientVenueError("down: outage")), _StubVenue("slow", None)],
        timeout_secs=0.05,
    )
    with pytest.raises(TransientVenueError, match=r"down: outage; slow: no quote within 0\.05 s"):
        await router.best_quote("SOL", "USDC", 1.0)


async def test_router_pair_nobody_has_is_not_transient() -> None:
    router = Router(
        [
            _StubVenue("a", UnsupportedPairError("a has no pool")),
            _StubVenue("b", UnsupportedPairError("b has no pool")),
        ]
    )
    with pytest.raises(UnsupportedPairError, match="No venue offers a BONK/RAY pool"):
        await router.best_quote("BONK", "RAY", 1.0)
    # One venue down and the other without the pair: the first may have it later.
    router = Router(
        [_StubVenue("a", UnsupportedPairError("no pool")), _StubVenue("b", TransientVenueError("x"))]
    )
    with pytest.raises(TransientVenueError):
        await router.best_quote("BONK", "RAY", 1.0)
