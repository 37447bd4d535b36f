"""The tests' own hands on the devnet (tests/devnet_fixtures.py): blocks, balances,
and trades by another account that move pools."""

from __future__ import annotations

import math
from typing import Any

from eth_account import Account
from web3 import Web3
from web3.logs import DISCARD

from engine.execution.venues.evm_chain import MAX_UINT256, load_abi
from engine.ops.devnet_keys import OTHER_KEY


class DevnetMarket:
    """The test's own hands on the devnet (synchronous web3): blocks, and trades by
    another account (OTHER_KEY) that move pools."""

    def __init__(self, url: str, doc: dict[str, Any]) -> None:
        self.w3 = Web3(Web3.HTTPProvider(url))
        self.doc = doc
        self.other = Account.from_key(OTHER_KEY)
        self.erc20 = load_abi("v2-core", "IERC20")
        self.router_abi = load_abi("v2-periphery", "IUniswapV2Router02")
        self.factory_abi = load_abi("v2-core", "IUniswapV2Factory")
        self.pair_abi = load_abi("v2-core", "IUniswapV2Pair")

    def rpc(self, method: str, *params: Any) -> Any:
        answer = self.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        assert "error" not in answer, answer
        return answer.get("result")

    def automine(self, on: bool) -> None:
        self.rpc("evm_setAutomine", on)

    def mine(self) -> None:
        self.rpc("evm_mine")

    def token(self, symbol: str) -> Any:
        return self.w3.eth.contract(address=self.doc["tokens"][symbol]["address"], abi=self.erc20)

    def balance(self, symbol: str, owner: str, block: Any = "latest") -> int:
        return int(self.token(symbol).functions.balanceOf(owner).call(block_identifier=block))

    def reserves(self, venue: str, sold: str, bought: str) -> tuple[int, int]:
        """(reserve of ``sold``, reserve of ``bought``) of the venue's pair."""
        factory = self.w3.eth.contract(address=self.doc["venues"][venue]["factory"], abi=self.factory_abi)
        a, b = self.token(sold).address, self.token(bought).address
        pair = self.w3.eth.contract(address=factory.functions.getPair(a, b).call(), abi=self.pair_abi)
        r0, r1, _ = pair.functions.getReserves().call()
        return (r0, r1) if int(a, 16) < int(b, 16) else (r1, r0)

    def _send(self, call: Any, tip_gwei: int = 50, max_fee_wei: int = 500 * 10**9) -> str:
        tx = call.build_transaction({
            "from": self.other.address, "nonce": self.w3.eth.get_transaction_count(self.other.address, "pending"),
            "gas": 300_000, "maxFeePerGas": max_fee_wei, "maxPriorityFeePerGas": tip_gwei * 10**9,
        })
        signed = self.other.sign_transaction(tx)
        return str(self.w3.eth.send_raw_transaction(signed.raw_transaction).to_0x_hex())

    def approve_other(self, venue: str, symbol: str) -> None:
        router = self.doc["venues"][venue]["router"]
        if self.token(symbol).functions.allowance(self.other.address, router).call() < 2**255:
            self.w3.eth.wait_for_transaction_receipt(
                self._send(self.token(symbol).functions.approve(router, MAX_UINT256)))

    def sell(self, venue: str, sold: str, bought: str, amount_in: int, tip_gwei: int = 50,
             max_fee_wei: int = 500 * 10**9) -> str:
        """OTHER sells ``amount_in`` base units of ``sold`` (no slippage limit), with a
        higher tip than the service's, so it goes first in the next block."""
        router = self.w3.eth.contract(address=self.doc["venues"][venue]["router"], abi=self.router_abi)
        path = [self.token(sold).address, self.token(bought).address]
        return self._send(router.functions.swapExactTokensForTokens(
            amount_in, 0, path, self.other.address, 2**255), tip_gwei, max_fee_wei)

    def move_price(self, venue: str, sold: str, bought: str, factor: float) -> None:
        """Make ``sold`` worth ``factor`` times what it is in ``bought`` on the venue's
        pool: selling dx of reserve x moves the price by (x / (x + dx))**2."""
        assert 0 < factor < 1
        reserve_in, _ = self.reserves(venue, sold, bought)
        self.sell(venue, sold, bought, int(reserve_in * (1 / math.sqrt(factor) - 1)))

    def swap_paid(self, receipt: Any, bought: str) -> int:
        """Base units of ``bought`` paid out by the one pair Swap event in ``receipt``
        (UniswapV2Pair.Swap: amount0Out or amount1Out, by the pair's token0)."""
        pair_abi_contract = self.w3.eth.contract(abi=self.pair_abi)
        events = pair_abi_contract.events.Swap().process_receipt(receipt, errors=DISCARD)
        assert len(events) == 1, events
        pair = self.w3.eth.contract(address=events[0]["address"], abi=self.pair_abi)
        token0 = pair.functions.token0().call()
        first = token0.lower() == self.token(bought).address.lower()
        return int(events[0]["args"]["amount0Out" if first else "amount1Out"])
