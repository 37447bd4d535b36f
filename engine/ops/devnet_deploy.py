"""Deploying the devnet's contracts on anvil: WETH9, the tokens, two Uniswap V2 venues.

Everything comes from the npm packages' build artifacts under ``devnet/node_modules``
(``make devnet-deps``): UniswapV2Factory (v2-core), UniswapV2Router02 and WETH9
(v2-periphery), and OpenZeppelin 2.5.1's ERC20DetailedMock for the tokens (an ERC-20
with configurable decimals and no mint: balances are written into its storage with
``anvil_setStorageAt``). engine.ops.devnet runs anvil and calls ``deploy``.

Units: token amounts are base units (``int``, ``amount * 10**decimals``) unless a
name says ``usd``; gas in gas units, fees in wei.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import time
from collections.abc import Mapping
from decimal import ROUND_DOWN, Decimal, localcontext
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_typing import ChecksumAddress, HexStr
from hexbytes import HexBytes
from web3 import Web3
from web3.types import Nonce, RPCEndpoint, TxParams, TxReceipt, Wei
from web3.utils.address import get_create2_address, get_create_address

from engine.core import (
    amounts,
    recursion,  # noqa: F401  - after web3: see the module
)
from engine.execution.venues.evm_chain import MAX_UINT256, NODE_MODULES
from engine.execution.venues.market import REFERENCE_PRICES_USD
from engine.ops.devnet_keys import DEPLOYER_KEY, OTHER_KEY, TRADER_KEY, WALLET_KEY

logger = logging.getLogger(__name__)

ARTIFACTS: Mapping[str, Path] = {
    "WETH9": NODE_MODULES / "@uniswap/v2-periphery/build/WETH9.json",
    "UniswapV2Factory": NODE_MODULES / "@uniswap/v2-core/build/UniswapV2Factory.json",
    "UniswapV2Pair": NODE_MODULES / "@uniswap/v2-core/build/UniswapV2Pair.json",
    "UniswapV2Router02": NODE_MODULES / "@uniswap/v2-periphery/build/UniswapV2Router02.json",
    "ERC20DetailedMock": NODE_MODULES / "@openzeppelin/contracts/build/contracts/ERC20DetailedMock.json",
}



@dataclasses.dataclass(frozen=True)
class PoolShape:
    """A venue's pools: ``usd_per_side`` of each token at the reference prices, and
    the first token of each pair (in the schema's token order) priced
    ``first_token_premium`` (a fraction) above its reference price in the second."""

    usd_per_side: Decimal
    first_token_premium: Decimal


# Deep pools on one venue, shallow and 0.5% off on the other: which is best depends on
# the direction and the size of the swap, as between real DEXes.
VENUES: Mapping[str, PoolShape] = {
    "uniswap_v2": PoolShape(Decimal(20_000_000), Decimal(0)),
    "sushiswap": PoolShape(Decimal(2_000_000), Decimal("0.005")),
}
# What the service's wallet, the trader and the tests' counterparty each get of every token.
FUNDING_USD = Decimal(5_000_000)
# OpenZeppelin 2.5.1 ERC20's storage: ``_balances`` mapping at slot 0, ``_totalSupply``
# at slot 2 (ERC20DetailedMock is ERC20, ERC20Detailed: ERC20's variables come first).
BALANCES_SLOT = 0
TOTAL_SUPPLY_SLOT = 2
# Fixed gas limits, so transactions go out back to back without estimating on a state
# their predecessors have not made yet. Gas used, measured: WETH9 604,440, a token
# 1,064,447, a factory 3,051,511, a router 4,757,729, approve 46,586, addLiquidity (it
# creates the pair) 2,726,653 at most.
GAS = {"WETH9": 1_000_000, "token": 1_500_000, "factory": 4_500_000, "router": 5_500_000,
       "approve": 100_000, "addLiquidity": 4_000_000}
MAX_FEE_WEI = 100 * 10**9  # anvil's base fee starts at 1 gwei
PRIORITY_FEE_WEI = 10**9
NO_DEADLINE = 2**256 - 1  # Router02's ``deadline`` (unix seconds): never


class DevnetError(RuntimeError):
    """The devnet could not be started or set up; the message says what to do."""


@functools.cache
def load_artifact(name: str) -> tuple[list[dict[str, Any]], str]:
    """The ABI and creation bytecode (0x-hex) of a contract in ``ARTIFACTS`` (read once)."""
    path = ARTIFACTS[name]
    if not path.is_file():
        raise DevnetError(f"no {path}: run `make devnet-deps`")
    doc = json.loads(path.read_bytes())
    bytecode = str(doc["bytecode"])
    return doc["abi"], bytecode if bytecode.startswith("0x") else "0x" + bytecode


def address_of(key: str) -> ChecksumAddress:
    """The checksummed address of a private key."""
    address: ChecksumAddress = Account.from_key(key).address
    return address


class _Sender:
    """Signed EIP-1559 transactions from one key, nonces tracked here, so they go out
    back to back; ``wait()`` waits for the last and checks every one succeeded.

    With interval mining (``--block-time``) each transaction is mined at once with
    ``evm_mine``: anvil 1.7.1 packing a block drops the rest of a sender's queued
    transactions when one of them does not fit the block's remaining gas (seen with
    the deploy's 53 transactions at 1 s blocks: 9 were dropped, the rest stuck)."""

    def __init__(self, w3: Web3, key: str) -> None:
        self.w3, self.key, self.address = w3, key, address_of(key)
        self.chain_id = w3.eth.chain_id
        self.nonce: int = w3.eth.get_transaction_count(self.address, "pending")
        self.sent: list[tuple[str, HexBytes]] = []
        self.mine_each = _rpc(w3, "anvil_getAutomine") is False

    def deploy(self, artifact: str, *args: Any, gas: int) -> ChecksumAddress:
        """Send ``artifact``'s creation with constructor ``args``; the contract's address to be."""
        abi, bytecode = load_artifact(artifact)
        address = get_create_address(self.address, Nonce(self.nonce))
        tx = self.w3.eth.contract(abi=abi, bytecode=bytecode).constructor(*args).build_transaction(
            self._fields(gas))
        self._send(f"deploy {artifact}", tx)
        return address

    def call(self, label: str, function: Any, *, gas: int) -> None:
        """Send a bound contract function (``contract.functions.f(args)``)."""
        self._send(label, function.build_transaction(self._fields(gas)))

    def _fields(self, gas: int) -> TxParams:
        return {"from": self.address, "nonce": Nonce(self.nonce), "gas": gas, "chainId": self.chain_id,
                "maxFeePerGas": Wei(MAX_FEE_WEI), "maxPriorityFeePerGas": Wei(PRIORITY_FEE_WEI),
                "value": Wei(0)}

    def _send(self, label: str, tx: TxParams) -> None:
        signed = Account.sign_transaction(tx, self.key)
        self.sent.append((label, self.w3.eth.send_raw_transaction(signed.raw_transaction)))
        self.nonce += 1
        if self.mine_each:
            _rpc(self.w3, "evm_mine")

    def wait(self, timeout_secs: float = 60.0) -> list[TxReceipt]:
        """Wait for the last transaction sent; raise DevnetError if any one reverted."""
        if not self.sent:
            return []
        self.w3.eth.wait_for_transaction_receipt(self.sent[-1][1], timeout=timeout_secs, poll_latency=0.01)
        receipts = [self.w3.eth.get_transaction_receipt(tx_hash) for _, tx_hash in self.sent]
        for (label, tx_hash), receipt in zip(self.sent, receipts, strict=True):
            if receipt["status"] != 1:
                raise DevnetError(f"{label} reverted (tx {tx_hash.to_0x_hex()}, gas used {receipt['gasUsed']})")
        self.sent = []
        return receipts


def base_units(usd: Decimal, price_usd: Decimal, decimals: int) -> int:
    """``usd`` worth of a token at ``price_usd`` per whole token, in base units, rounded down."""
    with localcontext() as ctx:
        ctx.prec = 60
        return int((usd / price_usd * 10**decimals).to_integral_value(ROUND_DOWN))


def pool_plan(venue: str) -> list[tuple[str, str, int, int]]:
    """``venue``'s pools: (token_a, token_b, amount_a, amount_b) for each of the 15 pairs,
    amounts in base units; token_a is first in the schema's token order."""
    shape, tokens = VENUES[venue], amounts.tokens()
    plan = []
    for a, b in itertools.combinations(tokens, 2):
        price_a, price_b = (Decimal(str(REFERENCE_PRICES_USD[t])) for t in (a, b))
        amount_a = base_units(shape.usd_per_side, price_a, tokens[a].decimals)
        amount_b = base_units(shape.usd_per_side * (1 + shape.first_token_premium), price_b,
                              tokens[b].decimals)
        plan.append((a, b, amount_a, amount_b))
    return plan


def deploy(rpc_url: str) -> dict[str, Any]:
    """Deploy WETH9, the tokens and both venues' pools on a fresh anvil at ``rpc_url``,
    fund the wallet, trader and counterparty accounts; the chain file's document
    (schemas/evm_chain.json). About 1.5 s (53 transactions, measured with automine).
    Raises DevnetError if anything fails to check out."""
    started = time.monotonic()
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    sender = _Sender(w3, DEPLOYER_KEY)
    symbols = amounts.tokens()
    weth = sender.deploy("WETH9", gas=GAS["WETH9"])
    token_address = {symbol: sender.deploy("ERC20DetailedMock", f"{symbol} (devnet)", symbol,
                                           token.decimals, gas=GAS["token"])
                     for symbol, token in symbols.items()}
    sender.wait()
    plans = {venue: pool_plan(venue) for venue in VENUES}
    _mint(w3, token_address, _balances(plans))

    erc20_abi, _ = load_artifact("ERC20DetailedMock")
    router_abi, _ = load_artifact("UniswapV2Router02")
    venues: dict[str, dict[str, str]] = {}
    for venue, plan in plans.items():
        factory = sender.deploy("UniswapV2Factory", sender.address, gas=GAS["factory"])
        router = sender.deploy("UniswapV2Router02", factory, weth, gas=GAS["router"])
        venues[venue] = {"router": router, "factory": factory}
        for symbol, address in token_address.items():
            token = w3.eth.contract(address=address, abi=erc20_abi)
            sender.call(f"{venue}: approve {symbol}", token.functions.approve(router, MAX_UINT256),
                        gas=GAS["approve"])
        contract = w3.eth.contract(address=router, abi=router_abi)
        for a, b, amount_a, amount_b in plan:
            add = contract.functions.addLiquidity(token_address[a], token_address[b], amount_a, amount_b,
                                                  amount_a, amount_b, sender.address, NO_DEADLINE)
            sender.call(f"{venue}: addLiquidity {a}/{b}", add, gas=GAS["addLiquidity"])
    sender.wait()
    _check_venues(w3, venues, token_address)
    doc = {
        "rpc_url": rpc_url,
        "chain_id": w3.eth.chain_id,
        "wallet": address_of(WALLET_KEY),
        "tokens": {s: {"address": token_address[s], "decimals": t.decimals} for s, t in symbols.items()},
        "venues": venues,
        "weth": weth,
    }
    logger.info("devnet deployed in %.2f s: %d tokens, venues %s", time.monotonic() - started,
                len(token_address), ", ".join(venues))
    return doc


def _balances(plans: Mapping[str, list[tuple[str, str, int, int]]]) -> dict[str, dict[ChecksumAddress, int]]:
    """What to mint, by token then holder: the pools' liquidity to the deployer,
    FUNDING_USD worth to each of the wallet, the trader and the counterparty."""
    tokens = amounts.tokens()
    deployer = address_of(DEPLOYER_KEY)
    balances = {symbol: {deployer: 0} for symbol in tokens}
    for plan in plans.values():
        for a, b, amount_a, amount_b in plan:
            balances[a][deployer] += amount_a
            balances[b][deployer] += amount_b
    for symbol, token in tokens.items():
        funding = base_units(FUNDING_USD, Decimal(str(REFERENCE_PRICES_USD[symbol])), token.decimals)
        for key in (WALLET_KEY, TRADER_KEY, OTHER_KEY):
            balances[symbol][address_of(key)] = funding
    return balances


def _mint(w3: Web3, token_address: Mapping[str, ChecksumAddress],
          balances: Mapping[str, Mapping[ChecksumAddress, int]]) -> None:
    """Write balances and total supplies into the tokens' storage (anvil_setStorageAt),
    then read them back through balanceOf and totalSupply."""
    abi, _ = load_artifact("ERC20DetailedMock")
    for symbol, holders in balances.items():
        address = token_address[symbol]
        for holder, amount in holders.items():
            slot = Web3.keccak(bytes.fromhex(holder[2:]).rjust(32, b"\0") + BALANCES_SLOT.to_bytes(32, "big"))
            _set_storage(w3, address, int.from_bytes(slot, "big"), amount)
        _set_storage(w3, address, TOTAL_SUPPLY_SLOT, sum(holders.values()))
        token = w3.eth.contract(address=address, abi=abi)
        for holder, amount in holders.items():
            if token.functions.balanceOf(holder).call() != amount:
                raise DevnetError(f"{symbol}: balanceOf({holder}) does not read back the balance "
                                  "written to storage: is the artifact OpenZeppelin 2.5.1's ERC20?")
        if token.functions.totalSupply().call() != sum(holders.values()):
            raise DevnetError(f"{symbol}: totalSupply() does not read back slot {TOTAL_SUPPLY_SLOT}")


def _set_storage(w3: Web3, address: str, slot: int, value: int) -> None:
    if _rpc(w3, "anvil_setStorageAt", address, f"0x{slot:064x}", f"0x{value:064x}") is not True:
        raise DevnetError(f"anvil_setStorageAt({address}, {slot}) did not answer true")


def _rpc(w3: Web3, method: str, *params: Any) -> Any:
    """The result of an anvil-specific JSON-RPC method; DevnetError on an error answer."""
    answer = w3.provider.make_request(RPCEndpoint(method), list(params))
    if "error" in answer:
        raise DevnetError(f"{method} failed: {answer['error']}: is {w3.provider} anvil?")
    return answer.get("result")


def _check_venues(w3: Web3, venues: Mapping[str, Mapping[str, str]],
                  token_address: Mapping[str, ChecksumAddress]) -> None:
    """Each factory holds the 15 pairs where Router02's hard-coded init-code hash
    (pairFor) looks for them, and each router quotes (getAmountsOut)."""
    factory_abi, _ = load_artifact("UniswapV2Factory")
    router_abi, router_bytecode = load_artifact("UniswapV2Router02")
    _, pair_bytecode = load_artifact("UniswapV2Pair")
    init_code_hash = Web3.keccak(hexstr=pair_bytecode).hex()
    if init_code_hash not in router_bytecode:
        raise DevnetError(f"UniswapV2Router02's hard-coded init-code hash is not {init_code_hash}, "
                          "the hash of v2-core's UniswapV2Pair bytecode: its pairFor finds no pool")
    (sym_a, a), (sym_b, b) = list(token_address.items())[:2]
    token0, token1 = sorted((a, b), key=lambda x: int(x, 16))
    salt = HexStr(Web3.solidity_keccak(["address", "address"], [token0, token1]).to_0x_hex())
    for venue, contracts in venues.items():
        factory = w3.eth.contract(address=Web3.to_checksum_address(contracts["factory"]), abi=factory_abi)
        router = w3.eth.contract(address=Web3.to_checksum_address(contracts["router"]), abi=router_abi)
        if (count := factory.functions.allPairsLength().call()) != 15:
            raise DevnetError(f"{venue}: the factory has {count} pairs, not 15")
        if factory.functions.getPair(a, b).call() != get_create2_address(factory.address, salt, HexStr(pair_bytecode)):
            raise DevnetError(f"{venue}: the {sym_a}/{sym_b} pool is not where v2-core's UniswapV2Pair "
                              "bytecode would be (CREATE2): init-code hash mismatch")
        quote = router.functions.getAmountsOut(10 ** amounts.tokens()[sym_a].decimals, [a, b]).call()
        if not quote[-1] > 0:
            raise DevnetError(f"{venue}: getAmountsOut quotes nothing for 1 {sym_a} to {sym_b}")

