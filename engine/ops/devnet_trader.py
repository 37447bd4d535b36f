"""The devnet's background trader: random swaps on its pools, so prices move.

Every ``interval_secs`` or so (randomised 0.5x-1.5x) it sells 0.05%-0.5% of a pool's
reserve of one token (``swapExactTokensForTokens`` with ``amountOutMin`` 0) for the other,
on a random venue, pair and direction, from anvil's dev account 2 (``TRADER_KEY``),
which the deployer funded. An RPC error is logged and the trader goes on; it stops
when cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from eth_account import Account
from eth_typing import ChecksumAddress
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import Web3Exception
from web3.types import Nonce, TxParams, Wei

from engine.core import recursion  # noqa: F401  - after web3: see the module
from engine.execution.venues.evm_chain import MAX_UINT256
from engine.ops.devnet_deploy import (
    MAX_FEE_WEI,
    PRIORITY_FEE_WEI,
    address_of,
    load_artifact,
)
from engine.ops.devnet_keys import TRADER_KEY

logger = logging.getLogger(__name__)

# Of the reserve of the token sold: small to medium swaps, 0.05% to 0.5%.
MIN_FRACTION, MAX_FRACTION = 0.0005, 0.005
SWAP_GAS = 250_000  # a two-token swap uses about 100,000
APPROVE_GAS = 100_000
DEADLINE_SECS = 600
RECEIPT_TIMEOUT_SECS = 30.0
# What a failed step may raise: the node down or slow, a revert, a malformed answer.
RPC_ERRORS = (Web3Exception, aiohttp.ClientError, OSError, TimeoutError, ValueError)


@dataclasses.dataclass(frozen=True)
class Swap:
    """One swap the trader made: ``amount_in`` base units of ``token_in`` on ``venue``."""

    venue: str
    token_in: str
    token_out: str
    amount_in: int
    pair: ChecksumAddress
    tx_hash: str
    succeeded: bool


class Trader:
    """Swaps from ``key``'s account on the pools of the chain file ``doc``."""

    def __init__(self, w3: AsyncWeb3[Any], doc: Mapping[str, Any], *, rng: random.Random,
                 key: str = TRADER_KEY) -> None:
        self.w3, self.doc, self.rng, self.key = w3, doc, rng, key
        self.address = address_of(key)
        erc20_abi, _ = load_artifact("ERC20DetailedMock")
        router_abi, _ = load_artifact("UniswapV2Router02")
        factory_abi, _ = load_artifact("UniswapV2Factory")
        self._pair_abi, _ = load_artifact("UniswapV2Pair")
        self.tokens: dict[str, AsyncContract] = {
            symbol: w3.eth.contract(address=w3.to_checksum_address(t["address"]), abi=erc20_abi)
            for symbol, t in doc["tokens"].items()}
        self.routers: dict[str, AsyncContract] = {
            venue: w3.eth.contract(address=w3.to_checksum_address(v["router"]), abi=router_abi)
            for venue, v in doc["venues"].items()}
        self.factories: dict[str, AsyncContract] = {
            venue: w3.eth.contract(address=w3.to_checksum_address(v["factory"]), abi=factory_abi)
            for venue, v in doc["venues"].items()}
        self.pairs = list(itertools.combinations(self.tokens, 2))
        self.approved = False

    async def approve_all(self) -> None:
        """Let every router spend every token of the trader's, without limit (once)."""
        nonce = await self.w3.eth.get_transaction_count(self.address, "pending")
        last = None
        for router in self.routers.values():
            for token in self.tokens.values():
                last = await self._send(token.functions.approve(router.address, MAX_UINT256), nonce, APPROVE_GAS)
                nonce = Nonce(nonce + 1)
        if last is not None:
            await self.w3.eth.wait_for_transaction_receipt(last, timeout=RECEIPT_TIMEOUT_SECS)
        self.approved = True

    async def step(self) -> Swap | None:
        """One random swap, its receipt awaited; None if the trader holds too little."""
        venue = self.rng.choice(list(self.routers))
        token_in, token_out = self.rng.choice(self.pairs)
        if self.rng.random() < 0.5:
            token_in, token_out = token_out, token_in
        pair = self.w3.eth.contract(
            address=await self.factories[venue].functions.getPair(
                self.tokens[token_in].address, self.tokens[token_out].address).call(),
            abi=self._pair_abi)
        reserve0, reserve1, _ = await pair.functions.getReserves().call()
        token0 = await pair.functions.token0().call()
        reserve_in = reserve0 if token0 == self.tokens[token_in].address else reserve1
        amount_in = int(reserve_in * self.rng.uniform(MIN_FRACTION, MAX_FRACTION))
        balance = await self.tokens[token_in].functions.balanceOf(self.address).call()
        if amount_in <= 0 or balance < amount_in:
            logger.info("devnet trader: %s short of %s, no swap", self.address, token_in)
            return None
        swap = self.routers[venue].functions.swapExactTokensForTokens(
            amount_in, 0, [self.tokens[token_in].address, self.tokens[token_out].address],
            self.address, int(time.time()) + DEADLINE_SECS)
        nonce = await self.w3.eth.get_transaction_count(self.address, "pending")
        tx_hash = await self._send(swap, nonce, SWAP_GAS)
        receipt = await self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_SECS)
        done = Swap(venue, token_in, token_out, amount_in, pair.address, tx_hash.to_0x_hex(),
                    receipt["status"] == 1)
        if not done.succeeded:
            logger.warning("devnet trader: swap reverted: %s", done)
        logger.debug("devnet trader: %s", done)
        return done

    async def _send(self, function: Any, nonce: Nonce, gas: int) -> Any:
        tx: TxParams = {"from": self.address, "nonce": nonce, "gas": gas,
                        "chainId": await self.w3.eth.chain_id, "value": Wei(0),
                        "maxFeePerGas": Wei(MAX_FEE_WEI), "maxPriorityFeePerGas": Wei(PRIORITY_FEE_WEI)}
        signed = Account.sign_transaction(await function.build_transaction(tx), self.key)
        return await self.w3.eth.send_raw_transaction(signed.raw_transaction)


def connect(rpc_url: str) -> AsyncWeb3[Any]:
    """An AsyncWeb3 on ``rpc_url`` (close with ``await w3.provider.disconnect()``)."""
    return AsyncWeb3(AsyncWeb3.AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": 10}))


async def run_trader(rpc_url: str, doc: Mapping[str, Any], *, interval_secs: float,
                     seed: int | None = None) -> None:
    """Approve once, then a swap every ``interval_secs`` (randomised) until cancelled.
    An RPC error is logged as a warning; the trader waits and goes on."""
    rng = random.Random(seed)
    w3 = connect(rpc_url)
    trader = Trader(w3, doc, rng=rng)
    logger.info("devnet trader: a swap every %.1f s or so from %s", interval_secs, trader.address)
    try:
        while True:
            try:
                if trader.approved:
                    await trader.step()
                else:
                    await trader.approve_all()
            except RPC_ERRORS as exc:
                logger.warning("devnet trader: %s: %s; trying again", type(exc).__name__, exc)
            await asyncio.sleep(interval_secs * rng.uniform(0.5, 1.5))
    finally:
        await w3.provider.disconnect()
