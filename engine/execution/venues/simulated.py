"""The simulated venues: Raydium- and Meteora-like DEXes trading on the simulated
market (engine.execution.venues.market), with a shared ledger in Redis.

Sent transactions are recorded in the ledger, keyed by tx_hash. Sending the same
transaction twice records and executes it once. A transaction executes at its
confirmation time, at that time's pool price: if the price moved beyond what the
transaction's ``min_amount_out`` allows, it reverts (slippage).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping

from redis.asyncio import Redis

from engine.core import amounts, keys
from engine.core.config import Config
from engine.core.pipelined import HotPath
from engine.core.store import Recorded
from engine.execution.venues.base import (
    SLIPPAGE,
    Quote,
    RecordTx,
    RejectedSwapError,
    SlippageExceededError,
    SwapRequest,
    SwapTx,
    TransientVenueError,
    TxState,
    TxStatus,
    UnsupportedPairError,
)
from engine.execution.venues.market import (
    DEFAULT_PROFILES,
    SimulatedMarket,
    VenueProfile,
    hash_units,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------
# The simulated venues and their shared ledger

# KEYS: ledger key. ARGV: TTL secs, then field/value pairs.
# Records a transaction once; a second send of the same tx_hash only counts itself.
_SEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'duplicate_sends', 1)
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: ledger key. ARGV: field/value pairs of the outcome.
# The first process to execute a due transaction writes its outcome; everyone else
# reads that outcome, so a transaction executes once whoever asks.
_SETTLE_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class SimulatedVenue:
    """A simulated DEX: pools from a SimulatedMarket, transactions in a Redis ledger."""

    def __init__(
        self,
        profile: VenueProfile,
        market: SimulatedMarket,
        redis: Redis,
        *,
        latency_secs: float = 0.0,
        confirm_latency_secs: tuple[float, float] = (0.0, 0.0),
        failure_rate: float = 0.0,
        ledger_ttl_secs: int = 7 * 24 * 3600,
        rng: random.Random | None = None,
        hot: HotPath | None = None,
    ) -> None:
        self.profile = profile
        self.market = market
        # The ledger's commands: over the worker's pipelined connection when given.
        self.hot = hot or HotPath(redis, None)
        self.latency_secs = latency_secs
        self.confirm_latency_secs = confirm_latency_secs
        self.failure_rate = failure_rate
        self.ledger_ttl_secs = ledger_ttl_secs
        self._rng = rng or random.Random()
        self._send = self.hot.script(_SEND_LUA)
        self._settle = self.hot.script(_SETTLE_LUA)

    @property
    def name(self) -> str:
        return self.profile.name

    async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        await self._network("quote")
        if isinstance(amount_in, bool) or not isinstance(amount_in, int) or amount_in <= 0:
            raise RejectedSwapError(f"amount_in must be a positive number of base units, not {amount_in!r}")
        at = self.market.now()
        pool = self.market.pool(self.profile, token_in, token_out, at)
        amount_out = pool.amount_out(amount_in)
        if amount_out <= 0:
            sold, bought = amounts.token(token_in), amounts.token(token_out)
            raise RejectedSwapError(
                f"{sold.from_base_units(amount_in)} {token_in} would buy less than the smallest "
                f"unit of {token_out} ({bought.unit:f}): too small to swap"
            )
        return Quote(
            venue=self.name,
            token_in=token_in,
            token_out=token_out,
            amount_in=amount_in,
            amount_out=amount_out,
            fee=pool.fee,
            price_impact=pool.price_impact(amount_in, amount_out),
            quoted_at=at,
        )

    async def build(self, swap: SwapRequest, record: RecordTx) -> SwapTx | None:
        """The swap's transaction (its hash a pure function of its content; no nonce),
        recorded, after a pre-flight on the pool as it is now (no network round
        trip: the market is local); raise SlippageExceededError if it would revert
        for slippage."""
        if swap.venue != self.name:
            raise RejectedSwapError(f"transaction for {swap.venue} built by {self.name}")
        pool = self.market.pool(self.profile, swap.token_in, swap.token_out, self.market.now())
        would_pay = pool.amount_out(swap.amount_in)
        if would_pay < swap.min_amount_out:
            raise SlippageExceededError(
                f"{self.name}: the swap would pay {would_pay} < {swap.min_amount_out} base units",
                would_pay,
            )
        tx = SwapTx.build(
            swap.order_id, swap.venue, swap.token_in, swap.token_out, swap.amount_in,
            swap.min_amount_out,
        )
        return tx if await record(tx) is Recorded.RECORDED else None

    async def speed_up(self, tx: SwapTx, record: RecordTx) -> SwapTx | None:
        """None: a simulated transaction's time to land does not depend on fees."""
        return None

    async def send(self, tx: SwapTx) -> str:
        if tx.venue != self.name:
            raise RejectedSwapError(f"transaction for {tx.venue} sent to {self.name}")
        if not self.profile.supports(tx.token_in, tx.token_out):
            raise UnsupportedPairError(f"{self.name} has no {tx.token_in}/{tx.token_out} pool")
        # A failed send never reached the venue: nothing is recorded.
        await self._network("send")
        sent_at = self.market.now()
        confirm_at = sent_at + self._confirm_latency(tx.tx_hash)
        record = {
            "tx_hash": tx.tx_hash,
            "order_id": tx.order_id,
            "venue": tx.venue,
            "token_in": tx.token_in,
            "token_out": tx.token_out,
            "amount_in": str(tx.amount_in),
            "min_amount_out": str(tx.min_amount_out),
            "sent_at": repr(sent_at),
            "confirm_at": repr(confirm_at),
            "state": TxState.PENDING.value,
        }
        args: list[str | int] = [self.ledger_ttl_secs]
        for field, value in record.items():
            args.extend((field, value))
        created = await self._send(keys=[keys.ledger(tx.tx_hash)], args=args)
        if created:
            logger.debug("%s: recorded %s for order %s", self.name, tx.tx_hash, tx.order_id)
        else:
            logger.info("%s: %s was already sent; not sending it again", self.name, tx.tx_hash)
        return tx.tx_hash

    async def status(self, tx: SwapTx) -> TxStatus:
        tx_hash = tx.tx_hash
        await self._network("status")
        record = await self._record(tx_hash)
        if not record or record.get("venue") != self.name:
            return TxStatus(TxState.UNKNOWN)
        if record["state"] == TxState.PENDING.value:
            confirm_at = float(record["confirm_at"])
            if self.market.now() < confirm_at:
                return TxStatus(TxState.PENDING)
            outcome = self._execute(record, confirm_at)
            args: list[str] = []
            for field, value in outcome.items():
                args.extend((field, value))
            settled = await self._settle(keys=[keys.ledger(tx_hash)], args=args)
            if settled == 1:
                logger.debug("%s: %s executed: %s", self.name, tx_hash, outcome["state"])
                record.update(outcome)
            else:
                record = await self._record(tx_hash)
                if not record:
                    return TxStatus(TxState.UNKNOWN)
        return _status_from_record(record)

    async def _record(self, tx_hash: str) -> dict[str, str]:
        return await self.hot.hgetall(keys.ledger(tx_hash))

    def _execute(self, record: Mapping[str, str], at: float) -> dict[str, str]:
        """Run the swap on the pool as it is at ``at``: the outcome to record."""
        amount_in = int(record["amount_in"])
        pool = self.market.pool(self.profile, record["token_in"], record["token_out"], at)
        amount_out = pool.amount_out(amount_in)
        state = TxState.CONFIRMED
        outcome = {"amount_out": str(amount_out), "executed_at": repr(at)}
        if amount_out < int(record["min_amount_out"]):
            state = TxState.REVERTED
            outcome["reason"] = SLIPPAGE
        outcome["state"] = state.value
        return outcome

    def _confirm_latency(self, tx_hash: str) -> float:
        low, high = self.confirm_latency_secs
        # From the hash, so the same transaction always takes the same time to land.
        u, _, _ = hash_units("latency", tx_hash)
        return low + (high - low) * u

    async def _network(self, operation: str) -> None:
        if self.latency_secs > 0:
            await asyncio.sleep(self.latency_secs)
        if self.failure_rate > 0 and self._rng.random() < self.failure_rate:
            raise TransientVenueError(f"{self.name}: {operation} failed (simulated outage)")


def _status_from_record(record: Mapping[str, str]) -> TxStatus:
    state = TxState(record["state"])
    if state is TxState.PENDING:
        return TxStatus(state)
    return TxStatus(state, amount_out=int(record["amount_out"]), reason=record.get("reason"))


def make_simulated_venues(
    redis: Redis,
    config: Config,
    market: SimulatedMarket | None = None,
    profiles: tuple[VenueProfile, ...] = DEFAULT_PROFILES,
    *,
    hot: HotPath | None = None,
) -> dict[str, SimulatedVenue]:
    """The default venues, configured from ``config``, by name; their ledger's
    commands go over ``hot`` (default: redis-py's ``redis``)."""
    market = market or SimulatedMarket(config.price_seed)
    return {
        profile.name: SimulatedVenue(
            profile,
            market,
            redis,
            # QUOTE_LATENCY_MS is the venue's round trip, for every call.
            latency_secs=config.quote_latency_ms / 1000,
            confirm_latency_secs=(
                config.confirm_latency_min_ms / 1000,
                config.confirm_latency_max_ms / 1000,
            ),
            failure_rate=config.venue_failure_rate,
            # The ledger answers "did this land?" for as long as an order is kept.
            ledger_ttl_secs=config.order_ttl_secs,
            hot=hot,
        )
        for profile in profiles
    }
