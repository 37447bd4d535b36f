"""The EVM venues pass the Venue contract (tests/venue_contract.py) on a real chain:
anvil, with the real Uniswap V2 contracts deployed once per session (the ``devnet``
fixture, tests/devnet_fixtures.py). Automine is off during each test, so a "block"
happens when the test says (``settle``); another account's trade moves a pool
(``move_price``), ordered before the service's swap in the block by its higher tip.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from redis.asyncio import Redis
from tornado.ioloop import IOLoop
from web3 import Web3

from engine.core import amounts, keys
from engine.core.config import Config, ConfigError
from engine.core.store import CLAIM_NONCE_LUA, OrderStore, Recorded
from engine.execution.driver import OrderDriver
from engine.execution.router import Router
from engine.execution.venues.base import SLIPPAGE, RejectedSwapError, SwapRequest, SwapTx, TxState, Venue
from engine.execution.venues.evm import EvmVenue, make_evm_venues
from engine.execution.venues.evm_chain import ChainFile, EvmChain, EvmSetupError, connect_node, load_wallet
from engine.ops.devnet_keys import WALLET_KEY
from tests.evm_market import DevnetMarket
from tests.helpers import VALID_ORDER
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
    io_loop.run_sync(chain.check)
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

    async def test_a_slippage_revert_inside_a_sandwich_is_a_slippage_revert(self, venue: Venue) -> None:
        # Front-run, the swap, back-run, all in one block: at the end of the block the
        # pool is about where it was, yet the swap reverted for slippage at its place.
        market = self.market
        market.automine(True)
        market.approve_other(self.NAME, self.TOKEN_OUT)
        market.automine(False)
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        tx = await self.tx_for(venue, self.SMALL, quote.amount_out * 99 // 100)
        reserve_in, _ = market.reserves(self.NAME, self.TOKEN_IN, self.TOKEN_OUT)
        front_in = reserve_in // 50
        front_out = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, front_in)
        market.sell(self.NAME, self.TOKEN_IN, self.TOKEN_OUT, front_in)  # tip 50 gwei: first
        await venue.send(tx)  # the node's tip (1 gwei): second
        # Third: no tip, and a fee cap just above the base fee (anvil orders by fees).
        base_fee = int(market.w3.eth.get_block("latest")["baseFeePerGas"])
        market.sell(self.NAME, self.TOKEN_OUT, self.TOKEN_IN, front_out.amount_out, tip_gwei=0,
                    max_fee_wei=base_fee * 2)
        market.mine()
        receipt = market.w3.eth.get_transaction_receipt(tx.tx_hash)  # type: ignore[arg-type]
        assert receipt["transactionIndex"] == 1 and receipt["status"] == 0
        block = market.w3.eth.get_block(receipt["blockNumber"])
        assert len(block["transactions"]) == 3
        reverted = await venue.status(tx)
        assert reverted.state is TxState.REVERTED and reverted.reason == SLIPPAGE
        assert reverted.amount_out is not None and reverted.amount_out < tx.min_amount_out


    async def test_a_nonce_another_transaction_used_rejects_the_swap_once_deep(self, venue: Venue) -> None:
        # Someone signed another transaction with the wallet's key and the nonce the
        # recorded swap holds: the swap can never be mined. Said so (the order fails)
        # once that nonce is mined, never while a node may just be behind.
        assert isinstance(venue, EvmVenue)
        quote = await venue.quote(self.TOKEN_IN, self.TOKEN_OUT, self.SMALL)
        tx = await self.tx_for(venue, self.SMALL, quote.amount_out * 99 // 100)
        assert tx.nonce is not None
        wallet = venue.chain.account
        other = wallet.sign_transaction({
            "type": 2, "chainId": 31337, "to": wallet.address, "value": 0, "gas": 21_000,
            "maxFeePerGas": 10 * 10**9, "maxPriorityFeePerGas": 10**9, "nonce": tx.nonce.nonce})
        self.market.w3.eth.send_raw_transaction(other.raw_transaction)
        self.market.mine()
        with pytest.raises(RejectedSwapError, match=f"nonce {tx.nonce.nonce} was used by another"):
            await venue.send(tx)
        assert (await venue.status(tx)).state is TxState.UNKNOWN


class TestSushiswap(_EvmContract):
    NAME = "sushiswap"


# -- The driver on the chain (in process) --------------------------------------------------


class _MovedBeforeSending:
    """An EVM venue whose pool another account moves between routing and building:
    the order's quote is stale when the driver builds its transaction."""

    def __init__(self, venue: EvmVenue, market: DevnetMarket) -> None:
        self.inner = venue
        self.market = market
        self.name = venue.name

    async def quote(self, *args: Any) -> Any:
        return await self.inner.quote(*args)

    async def build(self, swap: Any, record: Any) -> Any:
        self.market.move_price(self.name, swap.token_in, swap.token_out, 0.97)  # mined at once
        return await self.inner.build(swap, record)

    async def send(self, tx: SwapTx) -> str:
        return await self.inner.send(tx)

    async def status(self, tx: SwapTx) -> Any:
        return await self.inner.status(tx)


async def test_the_pre_flight_fails_an_order_the_price_moved_away_from_before_sending(
    chain: EvmChain, market: DevnetMarket, redis: Redis, config: Config
) -> None:
    venues = make_evm_venues(chain)
    for venue in venues.values():
        await venue.prepare()
        market.approve_other(venue.name, "SOL")
    moved = {name: _MovedBeforeSending(v, market) for name, v in venues.items()}
    store = OrderStore(redis, config)
    driver = OrderDriver(store, moved, Router(moved))  # type: ignore[arg-type]
    order_id = str(uuid.uuid4())
    await store.create(order_id, {**VALID_ORDER, "token_in": "SOL", "token_out": "USDC", "amount": 2,
                                  "max_slippage": 0.01})
    nonce_before = market.w3.eth.get_transaction_count(chain.address, "pending")
    await driver.execute(order_id)
    order = await store.get(order_id)
    assert order is not None and order.status == "failed" and order.reason
    assert order.reason.startswith("Price moved ") and order.reason.endswith("(max allowed: 1.0%)")
    # Refused before signing: no transaction recorded, none sent, no nonce taken.
    assert order.tx_hash is None and order.tx is None
    assert market.w3.eth.get_transaction_count(chain.address, "pending") == nonce_before
    assert int(await redis.get(chain.nonce_key) or nonce_before) == nonce_before


async def test_a_resumed_order_sends_its_recorded_bytes_and_never_signs_again(
    chain: EvmChain, market: DevnetMarket, redis: Redis, config: Config
) -> None:
    # A worker recorded the signed swap and died before broadcasting it. The driver
    # that resumes the order broadcasts those very bytes: one nonce, one trade.
    venues = make_evm_venues(chain)
    venue = venues["uniswap_v2"]
    await venue.prepare()
    store = OrderStore(redis, config)
    order_id = str(uuid.uuid4())
    await store.create(order_id, {**VALID_ORDER, "token_in": "SOL", "token_out": "USDC", "amount": 1,
                                  "max_slippage": 0.05})
    quote = await venue.quote("SOL", "USDC", 10**9)
    for status, fields in (("routing", {}), ("building", {
            "venue": venue.name, "quoted_price": quote.price,
            "min_amount_out": amounts.token("USDC").from_base_units(quote.amount_out * 95 // 100)})):
        assert (await store.transition(order_id, status, **fields)).applied
    order = await store.get(order_id)
    assert order is not None
    driver = OrderDriver(store, venues, Router(venues))

    async def record(tx: SwapTx) -> Recorded:
        claim = tx.nonce
        assert claim is not None
        return await store.record_tx(order_id, tx.tx_hash, tx.record(), nonce_key=claim.key, nonce=claim.nonce,
                                     ledger_key=claim.ledger, raw=tx.raw)

    recorded = await venue.build(driver._swap(order, venue), record)  # noqa: SLF001 - the step a dead worker took
    assert recorded is not None and (await venue.status(recorded)).state.value == "unknown"
    signed_before = market.w3.eth.get_transaction_count(chain.address, "pending")
    await driver.execute(order_id)
    done = await store.get(order_id)
    assert done is not None and done.status == "confirmed" and done.tx_hash == recorded.tx_hash
    receipt = market.w3.eth.get_transaction_receipt(recorded.tx_hash)  # type: ignore[arg-type]
    assert receipt["status"] == 1 and market.swap_paid(receipt, "USDC") == amounts.token("USDC").to_base_units(
        done.amount_out)
    # Exactly one transaction more from the wallet: the recorded one.
    assert market.w3.eth.get_transaction_count(chain.address, "pending") == signed_before + 1
    assert int(await redis.get(chain.nonce_key) or 0) == signed_before + 1


def test_the_wallet_key_is_never_shown(tmp_path: Path) -> None:
    bad = "zz" + WALLET_KEY[4:]
    with pytest.raises(ConfigError) as refused:
        Config.from_env({"EVM_PRIVATE_KEY": bad})
    assert bad not in str(refused.value) and WALLET_KEY[2:] not in str(refused.value)
    config = Config.from_env({"EVM_PRIVATE_KEY": WALLET_KEY})
    assert WALLET_KEY[2:] not in repr(config)
    # A keystore (the V3 JSON format eth-account writes) opens to the same account.
    keystore = tmp_path / "wallet.json"
    keystore.write_text(json.dumps(Account.encrypt(WALLET_KEY, "pw", iterations=2)))
    opened = load_wallet(Config.from_env({"EVM_KEYSTORE": str(keystore), "EVM_KEYSTORE_PASSWORD": "pw"}))
    assert opened.address == Account.from_key(WALLET_KEY).address
    with pytest.raises(EvmSetupError) as wrong:
        load_wallet(Config.from_env({"EVM_KEYSTORE": str(keystore), "EVM_KEYSTORE_PASSWORD": "no"}))
    assert "pw" not in str(wrong.value).replace(str(keystore), "")


def test_importing_web3_leaves_the_recursion_limit_alone() -> None:
    # py_ecc raises it to 100,000 when imported (engine/core/recursion.py undoes it).
    import sys

    import engine.execution.venues.evm  # noqa: F401
    import engine.ops.devnet  # noqa: F401
    assert sys.getrecursionlimit() == 1000


class _Died(Exception):
    pass


async def test_an_approval_recorded_by_a_worker_that_died_is_broadcast_by_the_next(
    devnet: Any, chain: EvmChain, market: DevnetMarket, redis: Redis
) -> None:
    # Two workers start at once on a wallet: each records an approval (nonces N and
    # N + 1) and dies before sending it. Left so, N would stall every later
    # transaction of the wallet. The next worker sends both recorded approvals, in
    # nonce order, and signs none of its own.
    token = chain.chain.tokens["RAY"]
    spenders = [Account.create().address for _ in range(2)]  # routers nobody approved yet
    mined = market.w3.eth.get_transaction_count(chain.address, "latest")

    async def dies(raw: str, what: str) -> None:
        raise _Died(what)

    first = chain
    second = EvmChain(connect_node(devnet.url), Account.from_key(WALLET_KEY), chain.chain, redis)
    await second.check()
    for worker, spender in zip((first, second), spenders, strict=True):
        worker._broadcast_and_wait = dies  # type: ignore[method-assign]
        with pytest.raises(_Died):
            await worker.ensure_allowance(token, spender)
    await second.w3.provider.disconnect()
    assert [nonce for _, nonce in await redis.zrange(chain.ledger_key, 0, -1, withscores=True)] == [mined, mined + 1]
    assert int(await redis.get(chain.nonce_key) or 0) == mined + 2  # taken, not sent: a gap

    successor = EvmChain(connect_node(devnet.url), Account.from_key(WALLET_KEY), chain.chain, redis)
    try:
        await successor.check()
        assert await successor.reconcile() == []  # what a starting worker does first: sends, fills none
        for spender in spenders:
            await successor.ensure_allowance(token, spender)
    finally:
        await successor.w3.provider.disconnect()
    erc20 = market.token("RAY")
    for spender in spenders:
        assert erc20.functions.allowance(chain.address, spender).call() == 2**256 - 1
    assert market.w3.eth.get_transaction_count(chain.address, "latest") == mined + 2  # two approvals
    assert market.w3.eth.get_transaction_count(chain.address, "pending") == mined + 2  # no gap


async def test_a_nonce_whose_transaction_is_lost_is_filled_at_start(
    devnet: Any, chain: EvmChain, market: DevnetMarket, redis: Redis, config: Config
) -> None:
    # Two swaps recorded (nonces N, N + 1) and never broadcast; the first one's signed
    # bytes are then lost (its ledger entry and order gone). The next worker fills N
    # with a zero-value transfer to itself and sends N + 1's recorded bytes: nothing
    # of the wallet is stuck behind N.
    venue = make_evm_venues(chain)["uniswap_v2"]
    await venue.prepare()
    quote = await venue.quote("SOL", "USDC", 10**9)
    swap = SwapRequest("gap-test", venue.name, "SOL", "USDC", 10**9, quote.amount_out * 95 // 100)
    claim_script = redis.register_script(CLAIM_NONCE_LUA)

    async def record(tx: SwapTx) -> Recorded:
        assert tx.nonce is not None
        return Recorded(int(await claim_script(keys=[tx.nonce.key, tx.nonce.key, tx.nonce.ledger],
                                               args=["", "", tx.nonce.nonce, tx.raw])))

    lost, kept = [await venue.build(swap, record) for _ in range(2)]
    assert lost is not None and kept is not None and lost.nonce and kept.nonce
    assert kept.nonce.nonce == lost.nonce.nonce + 1
    await redis.zrem(chain.ledger_key, lost.raw)
    mined = market.w3.eth.get_transaction_count(chain.address, "latest")
    assert mined == lost.nonce.nonce

    successor = EvmChain(connect_node(devnet.url), Account.from_key(WALLET_KEY), chain.chain, redis)
    try:
        await successor.check()
        assert await successor.reconcile() == [lost.nonce.nonce]
    finally:
        await successor.w3.provider.disconnect()
    market.w3.eth.wait_for_transaction_receipt(kept.tx_hash)  # type: ignore[arg-type]
    assert market.w3.eth.get_transaction_count(chain.address, "latest") == mined + 2
    assert market.w3.eth.get_transaction_count(chain.address, "pending") == mined + 2
    kept_receipt = market.w3.eth.get_transaction_receipt(kept.tx_hash)  # type: ignore[arg-type]
    assert kept_receipt["status"] == 1
    # Automine: the filler was mined in the block just before, alone.
    filler = market.w3.eth.get_transaction_by_block(kept_receipt["blockNumber"] - 1, 0)
    assert (filler["nonce"], filler["to"], filler["value"]) == (lost.nonce.nonce, chain.address, 0)
    assert (await venue.status(lost)).state is TxState.UNKNOWN  # never mined: its nonce went to the filler


async def test_a_chain_is_named_by_its_genesis_and_redis_must_be_durable(
    chain: EvmChain, redis: Redis, devnet: Any
) -> None:
    # A devnet started afresh has the same chain id and wallet but a new genesis: it
    # does not inherit the last one's nonces (a stale one would queue every
    # transaction behind a nonce that never comes).
    genesis = Web3(Web3.HTTPProvider(devnet.url)).eth.get_block(0)["hash"].to_0x_hex()
    assert chain.nonce_key == keys.next_nonce(f"31337:{genesis[2:18]}", chain.address)
    # The test Redis runs appendfsync everysec: a worker would refuse it.
    assert (await redis.config_get("appendfsync"))["appendfsync"] == "everysec"
    with pytest.raises(EvmSetupError, match="appendfsync always"):
        await chain.check_durability()
    await redis.config_set("appendfsync", "always")
    try:
        await chain.check_durability()
    finally:
        await redis.config_set("appendfsync", "everysec")
