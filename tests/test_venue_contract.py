"""The simulated venues pass the Venue contract (tests/venue_contract.py)."""

from __future__ import annotations

import dataclasses

import pytest
from redis.asyncio import Redis

from engine.core.config import Config
from engine.execution.venues.base import Venue
from engine.execution.venues.market import ManualClock, SimulatedMarket
from engine.execution.venues.simulated import SimulatedVenue, make_simulated_venues
from tests.venue_contract import VenueContract


class _SimulatedContract(VenueContract):
    clock: ManualClock

    def simulated(self, redis: Redis, config: Config, name: str) -> Venue:
        self.clock = ManualClock()
        # Transactions land one second after they are sent; prices move only when told.
        slow = dataclasses.replace(config, confirm_latency_min_ms=1000, confirm_latency_max_ms=1000)
        market = SimulatedMarket(config.price_seed, self.clock, volatility=0)
        return make_simulated_venues(redis, slow, market)[name]

    async def settle(self, venue: Venue) -> None:
        self.clock.advance(1.0)

    async def move_price(self, venue: Venue, factor: float) -> None:
        assert isinstance(venue, SimulatedVenue)
        venue.market.shock(self.TOKEN_IN, factor)


class TestRaydium(_SimulatedContract):
    @pytest.fixture
    def venue(self, redis: Redis, config: Config) -> Venue:
        return self.simulated(redis, config, "raydium")


class TestMeteora(_SimulatedContract):
    @pytest.fixture
    def venue(self, redis: Redis, config: Config) -> Venue:
        return self.simulated(redis, config, "meteora")
