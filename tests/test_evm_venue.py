"""The EVM venues pass the Venue contract (tests/venue_contract.py) on a real chain:
anvil, with the real Uniswap V2 contracts deployed once per session (the ``devnet``
fixture, tests/devnet_fixtures.py). Automine is off during each test, so a "block"
happens when the test says (``settle``); another account's trade moves a pool
(``move_price``), ordered before the service's swap in the block by its higher tip.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from redis.asyncio import Redis
from tornado.ioloop import IOLoop

from engine.execution.venues.base import SwapTx, Venue
from engine.execution.venues.evm import EvmVenue, make_evm_venues
from engine.execution.venues.evm_chain import ChainFile, EvmChain, connect_node
from engine.ops.devnet_keys import WALLET_KEY
from tests.evm_market import DevnetMarket
from tests.venue_contract import VenueContract


@pytest.fixture
def market(devnet: Any) -> Iterator[DevnetMarket]:
    market = DevnetMarket(devnet.url, devnet.doc)
    yield market
    market.rpc("anvil_dropAllTransactions")
    market.automine(True)


@pytest.fixture
def chain(devnet: Any, redis: Redis, io_loop: IOLoop) -> Iterator[EvmChain]:
    chain = EvmChain(connect_node(devnet.url), Account.from_key(WALLET_KEY), ChainFile.from_doc(devnet.doc), redis)
    yield chain
    io_loop.run_sync(chain.w3.provider.disconnect)


class _EvmContract(VenueContract):
    NAME = ""

    @pytest.fixture
    def venue(self, chain: EvmChain, market: DevnetMarket, io_loop: IOLoop) -> Venue:
        venue = make_evm_venues(chain)[self.NAME]
        io_loop.run_sync(venue.prepare)  # the wallet's approvals, mined at once
        market.approve_other(self.NAME, self.TOKEN_IN)
        market.automine(False)
        self.market = market
        return venue

    async def settle(self, venue: Venue) -> None:
        self.market.mine()

    async def move_price(self, venue: Venue, factor: float) -> None:
        self.market.move_price(venue.name, self.TOKEN_IN, self.TOKEN_OUT, factor)

    async def assert_executed_once(self, venue: Venue, tx: SwapTx, amount_out: int) -> None:
        # The chain is the ledger: the wallet received amount_out in the swap's block.
        assert isinstance(venue, EvmVenue)
        receipt = self.market.w3.eth.get_transaction_receipt(tx.tx_hash)  # type: ignore[arg-type]
        block = receipt["blockNumber"]
        wallet = venue.chain.address
        received = self.market.balance(self.TOKEN_OUT, wallet, block) - self.market.balance(
            self.TOKEN_OUT, wallet, block - 1)
        assert received == amount_out
        assert self.market.w3.eth.get_transaction_count(wallet, "latest") == tx.nonce.nonce + 1  # type: ignore[union-attr]


class TestUniswapV2(_EvmContract):
    NAME = "uniswap_v2"


class TestSushiswap(_EvmContract):
    NAME = "sushiswap"
