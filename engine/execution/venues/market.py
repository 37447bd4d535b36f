"""The simulated market: reference prices and constant-product pools, at any time.

* Reference USD prices move as a seeded random walk that is a pure function of
  (seed, token, time bucket), so every worker process sees the same prices at the
  same time and tests are reproducible.
* Each venue has a constant-product pool (x·y = k) per pair, re-derived from the
  reference prices at a given time, with its own fee, depth and a small deterministic
  offset from the reference price: the best venue changes over time, and price impact
  grows with the size of the order. Swaps are computed in integer base units, as
  Uniswap V2's ``getAmountOut`` does, rounded down.

The venues that trade on it, and their ledger, are in engine.execution.venues.simulated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from decimal import Decimal

from engine.core import amounts
from engine.execution.venues.base import UnsupportedPairError

# ---------------------------------------------------------------------------------
# The simulated market

# Reference prices in USD at the start of the walk. The keys must be exactly the
# token enum of schemas/common.json (a test checks).
REFERENCE_PRICES_USD: Mapping[str, float] = {
    "SOL": 220.0,
    "USDC": 1.0,
    "USDT": 1.0,
    "BONK": 0.000025,
    "JUP": 0.85,
    "RAY": 3.2,
}
STABLECOINS = frozenset({"USDC", "USDT"})

# Standard deviation of the log price per bucket. SOL at 0.04% a second is a
# typical crypto day; USDC is the unit everything else is measured against.
_VOLATILITY_PER_BUCKET: Mapping[str, float] = {
    "SOL": 0.0004,
    "USDC": 0.0,
    "USDT": 0.00002,
    "BONK": 0.0009,
    "JUP": 0.0006,
    "RAY": 0.0006,
}
PRICE_BUCKET_SECS = 1.0
# A price is the starting price moved by the last WALK_WINDOW_BUCKETS steps only
# (a moving sum of increments). Locally it is a random walk; globally it cannot
# drift away forever, so a long-running demo keeps sensible prices.
WALK_WINDOW_BUCKETS = 900
# Rare jumps (news, liquidations): the reason real orders sometimes fail on slippage.
JUMP_PROBABILITY_PER_BUCKET = 0.0005
JUMP_MIN = 0.01
JUMP_MAX = 0.04
# Log-price increments are kept as integers in these units, so a price is an exact
# sum and every process (and every order of summation) agrees to the last bit.
_LOG_UNIT = 1e-9
_PRICE_CACHE_SIZE = 256

# USD value of each side of a pool, per pair, before a venue's depth factor.
PAIR_DEPTH_USD: Mapping[tuple[str, str], float] = {
    ("SOL", "USDC"): 6_000_000.0,
    ("SOL", "USDT"): 1_500_000.0,
    ("USDC", "USDT"): 8_000_000.0,
    ("BONK", "SOL"): 1_200_000.0,
    ("JUP", "SOL"): 900_000.0,
    ("RAY", "SOL"): 700_000.0,
    ("BONK", "USDC"): 600_000.0,
    ("JUP", "USDC"): 1_500_000.0,
    ("RAY", "USDC"): 900_000.0,
    ("BONK", "USDT"): 150_000.0,
    ("JUP", "USDT"): 200_000.0,
    ("RAY", "USDT"): 150_000.0,
    ("BONK", "JUP"): 100_000.0,
    ("BONK", "RAY"): 80_000.0,
    ("JUP", "RAY"): 120_000.0,
}
# Pools drift from the reference price between arbitrage rounds of this length.
OFFSET_BUCKET_SECS = 5.0


def pair_key(token_a: str, token_b: str) -> tuple[str, str]:
    """The pair in canonical (sorted) order."""
    a, b = sorted((token_a, token_b))
    return (a, b)


@dataclasses.dataclass(frozen=True)
class VenueProfile:
    """What makes one simulated venue differ from another."""

    name: str
    fee: float  # base fee, fraction of the input
    stable_fee: float  # base fee on a stablecoin/stablecoin pool
    dynamic_fee_max: float  # extra fee that varies over time (Meteora's DLMM style)
    depth_factor: float  # pool depth relative to PAIR_DEPTH_USD
    max_offset: float  # largest deviation of the pool price from the reference
    # Pairs the venue has pools for; None means every pair in PAIR_DEPTH_USD.
    pairs: frozenset[tuple[str, str]] | None = None

    def supports(self, token_in: str, token_out: str) -> bool:
        key = pair_key(token_in, token_out)
        if key not in PAIR_DEPTH_USD or token_in == token_out:
            return False
        return self.pairs is None or key in self.pairs


RAYDIUM = VenueProfile(
    name="raydium",
    fee=0.0025,
    stable_fee=0.0005,
    dynamic_fee_max=0.0,
    depth_factor=1.0,
    max_offset=0.0015,
)
# Cheaper base fee plus a dynamic part, shallower pools, and no pools for the
# thinnest pairs: it wins small orders at quiet times, Raydium wins big ones.
METEORA = VenueProfile(
    name="meteora",
    fee=0.0020,
    stable_fee=0.0001,
    dynamic_fee_max=0.0015,
    depth_factor=0.6,
    max_offset=0.0015,
    pairs=frozenset(PAIR_DEPTH_USD) - {("BONK", "RAY"), ("JUP", "RAY"), ("BONK", "USDT")},
)
DEFAULT_PROFILES = (RAYDIUM, METEORA)


# Fees are whole parts per million of the input, so a swap is integer arithmetic.
FEE_DENOMINATOR = 1_000_000


@dataclasses.dataclass(frozen=True)
class Pool:
    """A constant-product pool, seen from the side of one swap direction; reserves
    in base units, the fee in parts per million of the input."""

    reserve_in: int
    reserve_out: int
    fee_ppm: int

    @property
    def fee(self) -> Decimal:
        """The fee as a fraction of the input."""
        return Decimal(self.fee_ppm) / FEE_DENOMINATOR

    def amount_out(self, amount_in: int) -> int:
        """x·y = k: what ``amount_in`` base units buy after the fee, rounded down,
        exactly as Uniswap V2's ``UniswapV2Library.getAmountOut`` computes it (with
        the fee in ppm instead of per mille)."""
        with_fee = amount_in * (FEE_DENOMINATOR - self.fee_ppm)
        return with_fee * self.reserve_out // (self.reserve_in * FEE_DENOMINATOR + with_fee)

    def price_impact(self, amount_in: int, amount_out: int) -> Decimal:
        """The fraction of the fee-less mid-price output lost to the curve."""
        no_impact = amount_in * (FEE_DENOMINATOR - self.fee_ppm) * self.reserve_out
        lost = no_impact - amount_out * FEE_DENOMINATOR * self.reserve_in
        return Decimal(lost) / Decimal(no_impact)


class ManualClock:
    """A clock that only moves when told to, for deterministic tests."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs


def hash_units(*parts: object) -> tuple[float, float, float]:
    """Three independent uniforms in (0, 1], a pure function of ``parts``."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=24).digest()
    a, b, c = struct.unpack("<QQQ", digest)
    scale = 1.0 / 2.0**64
    return ((a + 1) * scale, (b + 1) * scale, (c + 1) * scale)


class SimulatedMarket:
    """Reference prices and pools for the simulated venues, at any time.

    ``clock`` (epoch seconds) is injectable: tests pass a ManualClock. ``shock`` moves
    a token's price from a given time on, deterministically; shocks are local to this
    object (a test and demo hook, not shared between processes).
    """

    def __init__(
        self,
        seed: int,
        clock: Callable[[], float] = time.time,
        *,
        volatility: float = 1.0,
    ) -> None:
        self.seed = seed
        self.clock = clock
        # Multiplies every token's volatility; 0 gives constant prices (for tests).
        self.volatility = volatility
        self._shocks: dict[str, list[tuple[float, float]]] = {}
        self._walk_cache: OrderedDict[tuple[str, int], int] = OrderedDict()

    def now(self) -> float:
        return self.clock()

    @property
    def tokens(self) -> list[str]:
        return list(REFERENCE_PRICES_USD)

    def shock(self, token: str, factor: float, from_time: float | None = None) -> None:
        """Multiply ``token``'s price by ``factor`` for every time >= ``from_time`` (default now)."""
        if token not in REFERENCE_PRICES_USD:
            raise ValueError(f"unknown token {token!r}")
        if not factor > 0:
            raise ValueError("factor must be greater than 0")
        at = self.now() if from_time is None else from_time
        self._shocks.setdefault(token, []).append((at, factor))

    def reference_price(self, token: str, at: float | None = None) -> float:
        """USD price of ``token`` at time ``at`` (default now)."""
        if token not in REFERENCE_PRICES_USD:
            raise ValueError(f"unknown token {token!r}")
        at = self.now() if at is None else at
        price = REFERENCE_PRICES_USD[token]
        sigma = _VOLATILITY_PER_BUCKET[token] * self.volatility
        if sigma > 0:
            bucket = math.floor(at / PRICE_BUCKET_SECS)
            price *= math.exp(self._walk(token, bucket) * _LOG_UNIT * self.volatility)
        for from_time, factor in self._shocks.get(token, ()):
            if at >= from_time:
                price *= factor
        return price

    def pool(self, profile: VenueProfile, token_in: str, token_out: str, at: float) -> Pool:
        """``profile``'s pool for the pair at time ``at``, oriented token_in -> token_out."""
        if not profile.supports(token_in, token_out):
            raise UnsupportedPairError(f"{profile.name} has no {token_in}/{token_out} pool")
        key = pair_key(token_in, token_out)
        stable = set(key) <= STABLECOINS
        offset_bucket = math.floor(at / OFFSET_BUCKET_SECS)
        u_offset, u_fee, _ = hash_units(self.seed, "pool", profile.name, *key, offset_bucket)
        # Stable pools are arbitraged much tighter.
        max_offset = profile.max_offset * (0.1 if stable else 1.0)
        offset = max_offset * (2.0 * u_offset - 1.0)
        fee = (profile.stable_fee if stable else profile.fee) + profile.dynamic_fee_max * u_fee
        depth = PAIR_DEPTH_USD[key] * profile.depth_factor
        # Reserves in base units (the walk is in floats; the pool itself is exact).
        reserve_a = int(depth / self.reference_price(key[0], at) * 10 ** amounts.token(key[0]).decimals)
        reserve_b = int(
            depth / self.reference_price(key[1], at) * (1.0 + offset) * 10 ** amounts.token(key[1]).decimals
        )
        fee_ppm = round(fee * FEE_DENOMINATOR)
        if token_in == key[0]:
            return Pool(reserve_in=reserve_a, reserve_out=reserve_b, fee_ppm=fee_ppm)
        return Pool(reserve_in=reserve_b, reserve_out=reserve_a, fee_ppm=fee_ppm)

    def _increment(self, token: str, bucket: int) -> int:
        """One step of the walk, in _LOG_UNITs (before the volatility multiplier)."""
        u1, u2, u3 = hash_units(self.seed, "walk", token, bucket)
        step = _VOLATILITY_PER_BUCKET[token] * math.sqrt(-2.0 * math.log(u1)) * math.cos(
            2.0 * math.pi * u2
        )
        if u3 < JUMP_PROBABILITY_PER_BUCKET:
            # u3 is uniform below the threshold too: reuse it for size and sign.
            v = u3 / JUMP_PROBABILITY_PER_BUCKET
            size = JUMP_MIN + (JUMP_MAX - JUMP_MIN) * abs(2.0 * v - 1.0)
            step += size if v >= 0.5 else -size
        return round(step / _LOG_UNIT)

    def _walk(self, token: str, bucket: int) -> int:
        """Sum of the last WALK_WINDOW_BUCKETS increments up to ``bucket``, cached."""
        cached = self._walk_cache.get((token, bucket))
        if cached is not None:
            return cached
        # Step from a nearby cached bucket when there is one (the common case: the
        # clock moved on by a second or two), else sum the whole window.
        total: int | None = None
        for (cached_token, cached_bucket), value in reversed(self._walk_cache.items()):
            distance = bucket - cached_bucket
            if cached_token == token and abs(distance) < WALK_WINDOW_BUCKETS // 4:
                total = value
                if distance > 0:
                    for b in range(cached_bucket + 1, bucket + 1):
                        total += self._increment(token, b)
                        total -= self._increment(token, b - WALK_WINDOW_BUCKETS)
                else:
                    for b in range(cached_bucket, bucket, -1):
                        total -= self._increment(token, b)
                        total += self._increment(token, b - WALK_WINDOW_BUCKETS)
                break
        if total is None:
            total = sum(
                self._increment(token, b) for b in range(bucket - WALK_WINDOW_BUCKETS + 1, bucket + 1)
            )
        self._walk_cache[(token, bucket)] = total
        if len(self._walk_cache) > _PRICE_CACHE_SIZE:
            self._walk_cache.popitem(last=False)
        return total
