"""EVM venues: Uniswap-V2-compatible routers (Uniswap V2, SushiSwap, PancakeSwap and
their forks run the same contracts) on an EVM chain, over JSON-RPC (MARKET=evm).

* Quote: Router02's ``getAmountsOut(amountIn, [tokenIn, tokenOut])`` by ``eth_call``
  (the pool's 0.3% fee and price impact included, exact integers), and the pair's
  ``getReserves`` for the price impact it reports.
* Build: ``swapExactTokensForTokens(amountIn, amountOutMin, path, wallet, deadline)``
  with ``amountOutMin`` = the driver's ``min_amount_out``. First a pre-flight
  (``eth_estimateGas``, which executes the swap on the latest state): a swap that
  would already revert with ``UniswapV2Router: INSUFFICIENT_OUTPUT_AMOUNT`` raises
  SlippageExceededError and spends no gas. Then the transaction is signed with the
  wallet's next free nonce and recorded on the order before it is returned
  (engine.execution.venues.evm_chain).
* Send: ``eth_sendRawTransaction`` of the recorded bytes; the node's "already known"
  or a "nonce too low" for a transaction it has mined means it was sent before.
* Status: the receipt, once ``CONFIRMATIONS`` blocks deep (its own block counts as
  1). ``amount_out`` is the pair's ``Swap`` event in the receipt (``amount0Out`` or
  ``amount1Out``), not the quote. A reverted swap is SLIPPAGE when, at its block, the
  pool paid less than ``amountOutMin``; else a plain reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal
from typing import Any, cast

from eth_typing import ABIFunction, HexStr
from eth_utils.abi import function_abi_to_4byte_selector
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
from web3.logs import DISCARD
from web3.types import RPCEndpoint, TxReceipt

from engine.core.store import Recorded
from engine.execution.venues.base import (
    SLIPPAGE,
    NonceClaim,
    Quote,
    RecordTx,
    RejectedSwapError,
    SlippageExceededError,
    SwapRequest,
    SwapTx,
    TransientVenueError,
    TxState,
    TxStatus,
    UnderpricedError,
    UnsupportedPairError,
)
from engine.execution.venues.evm_chain import (
    ALREADY_RECEIVED,
    TRANSPORT_ERRORS,
    ChainToken,
    EvmChain,
    load_abi,
    rpc,
)

# UniswapV2Library.getAmountOut keeps 3 of every 1000 units sold in the pool.
POOL_FEE = Decimal("0.003")
ZERO_ADDRESS = "0x" + "0" * 40
# The gas limit is eth_estimateGas's answer times this, plus a margin.
GAS_HEADROOM = Decimal("1.2")
# How nodes refuse a transaction for its fees (geth: "transaction underpriced",
# "replacement transaction underpriced", "max fee per gas less than block base fee";
# anvil says the last one too).
_UNDERPRICED = ("underpriced", "less than block base fee", "fee cap less than", "fee too low")
# Router02's require() messages (UniswapV2Router02.sol).
_SLIPPAGE_REVERT = "INSUFFICIENT_OUTPUT_AMOUNT"
_EXPIRED_REVERT = "EXPIRED"


class EvmVenue:
    """One Uniswap V2 router (and its factory) on ``chain``, under ``name``."""

    def __init__(self, name: str, chain: EvmChain, router: str, factory: str) -> None:
        self._name = name
        self.chain = chain
        w3 = chain.w3
        self.router = w3.eth.contract(address=AsyncWeb3.to_checksum_address(router),
                                      abi=load_abi("v2-periphery", "IUniswapV2Router02",
                                                   ("getAmountsOut", "swapExactTokensForTokens")))
        self.factory = w3.eth.contract(address=AsyncWeb3.to_checksum_address(factory),
                                       abi=load_abi("v2-core", "IUniswapV2Factory", ("getPair",)))
        self._pair_abi = load_abi("v2-core", "IUniswapV2Pair", ("getReserves", "Swap"))
        get_reserves = next(entry for entry in self._pair_abi if entry["name"] == "getReserves")
        self._get_reserves = "0x" + function_abi_to_4byte_selector(cast(ABIFunction, get_reserves)).hex()
        self._pairs: dict[tuple[str, str], AsyncContract] = {}

    @property
    def name(self) -> str:
        return self._name

    async def prepare(self) -> None:
        """Approve the router for every token of the chain file (once, ever)."""
        for token in self.chain.chain.tokens.values():
            await self.chain.ensure_allowance(token, self.router.address)

    # -- tokens and pools ------------------------------------------------------------

    def _token(self, symbol: str) -> ChainToken:
        token = self.chain.chain.tokens.get(symbol)
        if token is None:
            raise UnsupportedPairError(f"{self.name}: no {symbol} token on chain {self.chain.chain.chain_id}")
        return token

    async def _pair(self, sold: ChainToken, bought: ChainToken) -> AsyncContract:
        """The pair contract of two tokens (UniswapV2Factory.getPair), cached."""
        key = tuple(sorted((sold.address, bought.address)))
        pair = self._pairs.get(key)  # type: ignore[arg-type]
        if pair is None:
            address = await rpc("getPair", self.factory.functions.getPair(sold.address, bought.address).call())
            if int(address, 16) == 0:
                raise UnsupportedPairError(f"{self.name} has no {sold.symbol}/{bought.symbol} pool")
            pair = self.chain.w3.eth.contract(address=address, abi=self._pair_abi)
            self._pairs[key] = pair  # type: ignore[index]
        return pair

    async def _amount_out(self, amount_in: int, path: list[str], block: Any = "latest") -> int:
        try:
            out = await rpc("getAmountsOut",
                            self.router.functions.getAmountsOut(amount_in, path).call(block_identifier=block))
        except ContractLogicError as exc:  # e.g. UniswapV2Library: INSUFFICIENT_LIQUIDITY
            raise RejectedSwapError(f"{self.name}: {exc.message}") from None
        return int(out[-1])

    # -- the Venue contract -------------------------------------------------------------

    async def quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        if isinstance(amount_in, bool) or not isinstance(amount_in, int) or amount_in <= 0:
            raise RejectedSwapError(f"amount_in must be a positive number of base units, not {amount_in!r}")
        sold, bought = self._token(token_in), self._token(token_out)
        pair = await self._pair(sold, bought)
        amount_out, reserves = await asyncio.gather(
            self._amount_out(amount_in, [sold.address, bought.address]),
            rpc("getReserves", pair.functions.getReserves().call()),
        )
        if amount_out <= 0:
            raise RejectedSwapError(
                f"{amount_in} base units of {token_in} would buy less than one base unit of "
                f"{token_out}: too small to swap"
            )
        # Pairs hold their tokens sorted by address (UniswapV2Factory.createPair).
        sold_first = int(sold.address, 16) < int(bought.address, 16)
        reserve_in, reserve_out = (reserves[0], reserves[1]) if sold_first else (reserves[1], reserves[0])
        mid_out = Decimal(amount_in) * reserve_out / reserve_in * (1 - POOL_FEE)
        impact = max(Decimal(0), 1 - Decimal(amount_out) / mid_out) if mid_out else Decimal(0)
        return Quote(self.name, token_in, token_out, amount_in, amount_out, POOL_FEE, impact, time.time())

    async def build(self, swap: SwapRequest, record: RecordTx) -> SwapTx | None:
        sold, bought = self._token(swap.token_in), self._token(swap.token_out)
        pair = await self._pair(sold, bought)
        path = [sold.address, bought.address]
        deadline = int(time.time()) + self.chain.deadline_secs
        args = [swap.amount_in, swap.min_amount_out, path, self.chain.address, deadline]
        call = self.router.functions.swapExactTokensForTokens(*args)
        try:
            gas = await rpc("eth_estimateGas", call.estimate_gas({"from": self.chain.address}))
        except ContractLogicError as exc:
            if _SLIPPAGE_REVERT in str(exc):
                would_pay = await self._amount_out(swap.amount_in, path)
                raise SlippageExceededError(
                    f"{self.name}: the pool now pays {would_pay} < {swap.min_amount_out} base units",
                    would_pay,
                ) from None
            raise RejectedSwapError(f"{self.name}: the swap would revert: {exc.message}") from None
        max_fee, tip = await self.chain.fees()
        fields = self.chain.transaction(
            self.router.address, self.router.encode_abi("swapExactTokensForTokens", args=args),
            int(gas * GAS_HEADROOM) + 10_000, max_fee, tip,
        )
        # What reading the outcome takes, kept with the transaction: the chain file
        # may change while it is out.
        extra = (("deadline", str(deadline)), ("pair", str(pair.address)),
                 ("token_in", sold.address), ("token_out", bought.address), ("gas", str(fields["gas"])),
                 ("max_fee", str(max_fee)), ("tip", str(tip)))

        def tx_of(nonce: int, tx_hash: str, raw: str) -> SwapTx:
            return SwapTx.for_swap(swap, tx_hash, raw=raw, nonce=NonceClaim(self.chain.nonce_key, nonce, self.chain.ledger_key),
                                   extra=extra)

        async def record_signed(nonce: int, tx_hash: str, raw: str) -> Any:
            return await record(tx_of(nonce, tx_hash, raw))

        signed = await self.chain.sign_and_record(fields, record_signed)
        return None if signed is None else tx_of(*signed)

    async def speed_up(self, tx: SwapTx, record: RecordTx) -> SwapTx | None:
        """The same swap signed again with the same nonce and higher EIP-1559 fees:
        the node's current ones, and at least 12.5% above ``tx``'s (what geth asks
        of a replacement), capped at EVM_MAX_FEE_GWEI; None at the cap, or when
        ``record`` refuses it."""
        if tx.nonce is None:
            return None
        old_max, old_tip = int(tx.get("max_fee")), int(tx.get("tip"))
        max_fee, tip = await self.chain.fees(fresh=True)
        max_fee, tip = max(max_fee, old_max * 9 // 8 + 1), max(tip, old_tip * 9 // 8 + 1)
        if max_fee > self.chain.max_fee_wei:
            return None  # a node would refuse a smaller bump: nothing faster within the cap
        tip = min(tip, max_fee)
        args = [tx.amount_in, tx.min_amount_out, [tx.get("token_in"), tx.get("token_out")],
                self.chain.address, int(tx.get("deadline"))]
        tx_hash, raw = self.chain.sign(self.chain.transaction(
            self.router.address, self.router.encode_abi("swapExactTokensForTokens", args=args),
            int(tx.get("gas")), max_fee, tip, tx.nonce.nonce,
        ))
        extra = dict(tx.extra) | {"max_fee": str(max_fee), "tip": str(tip)}
        faster = dataclasses.replace(tx, tx_hash=tx_hash, raw=raw, extra=tuple(sorted(extra.items())))
        return faster if await record(faster) is Recorded.RECORDED else None

    async def send(self, tx: SwapTx) -> str:
        try:
            await self.chain.w3.eth.send_raw_transaction(HexStr(tx.raw))
        except TRANSPORT_ERRORS as exc:
            raise TransientVenueError(f"{self.name}: eth_sendRawTransaction: {exc!r}") from None
        except Web3RPCError as exc:
            text = str(exc).lower()
            if any(answer in text for answer in ALREADY_RECEIVED):
                return tx.tx_hash
            if "nonce too low" in text:
                return await self._nonce_used(tx)
            if any(answer in text for answer in _UNDERPRICED):
                raise UnderpricedError(f"{self.name}: {tx.tx_hash} refused at its fees: {exc}") from None
            raise TransientVenueError(f"{self.name}: eth_sendRawTransaction: {exc}") from None
        return tx.tx_hash

    async def _nonce_used(self, tx: SwapTx) -> str:
        """The node says ``tx``'s nonce is used: by ``tx`` itself (sent before: its
        hash), or, once that nonce is ``CONFIRMATIONS`` blocks deep with no receipt
        for ``tx``, by another transaction of the wallet (RejectedSwapError: ``tx`` can
        never be mined). Until then, TransientVenueError: a node behind its peers
        may not have ``tx``'s receipt yet."""
        if (await self.status(tx)).state is not TxState.UNKNOWN:
            return tx.tx_hash
        eth = self.chain.w3.eth
        head = await rpc("eth_blockNumber", eth.block_number)
        deep = max(0, head - self.chain.confirmations + 1)
        used = await rpc("eth_getTransactionCount", eth.get_transaction_count(self.chain.account.address, deep))
        nonce = tx.nonce.nonce if tx.nonce else None
        if nonce is None or nonce >= used or (await self.status(tx)).state is not TxState.UNKNOWN:
            raise TransientVenueError(f"{self.name}: nonce {nonce} used, but not yet deep, by {tx.tx_hash} or another")
        self.chain.forget_nonce()
        raise RejectedSwapError(
            f"{self.name}: the wallet's nonce {nonce} was used by another transaction; "
            f"{tx.tx_hash} can never be mined"
        )

    async def status(self, tx: SwapTx) -> TxStatus:
        eth = self.chain.w3.eth
        try:
            receipt = await rpc("eth_getTransactionReceipt", eth.get_transaction_receipt(HexStr(tx.tx_hash)))
        except TransactionNotFound:
            try:
                await rpc("eth_getTransactionByHash", eth.get_transaction(HexStr(tx.tx_hash)))
            except TransactionNotFound:
                return TxStatus(TxState.UNKNOWN)
            return TxStatus(TxState.PENDING)
        head = await rpc("eth_blockNumber", eth.block_number)
        if head - receipt["blockNumber"] + 1 < self.chain.confirmations:
            return TxStatus(TxState.PENDING, included=True)
        if receipt["status"] == 1:
            return TxStatus(TxState.CONFIRMED, amount_out=self._swapped_out(receipt, tx))
        return await self._revert_status(receipt, tx)

    def _swapped_out(self, receipt: TxReceipt, tx: SwapTx) -> int:
        """Base units of token_out the pair paid, from its Swap event in ``receipt``
        (UniswapV2Pair.Swap: amount0Out / amount1Out)."""
        pair_address = tx.get("pair")
        pair = self.chain.w3.eth.contract(address=AsyncWeb3.to_checksum_address(pair_address), abi=self._pair_abi)
        events = [e for e in pair.events.Swap().process_receipt(receipt, errors=DISCARD)
                  if e["address"].lower() == pair_address.lower()]
        if len(events) != 1:
            raise TransientVenueError(f"{self.name}: {tx.tx_hash} has {len(events)} Swap events of {pair_address}")
        sold, bought = tx.get("token_in"), tx.get("token_out")
        bought_first = int(bought, 16) < int(sold, 16)
        return int(events[0]["args"]["amount0Out" if bought_first else "amount1Out"])

    async def _revert_status(self, receipt: TxReceipt, tx: SwapTx) -> TxStatus:
        """Why a mined swap reverted. From the node's trace of it where the node has
        one (``debug_traceTransaction`` with geth's ``callTracer``: the revert string,
        and the pair's reserves as the router read them, at the swap's own place in
        its block); else from the pool at the end of its block against amountOutMin,
        then its deadline."""
        trace = await self._trace(tx)
        if trace is not None:
            reason = str(trace.get("revertReason") or trace.get("error") or "no reason given")
            if _SLIPPAGE_REVERT in reason:
                return TxStatus(TxState.REVERTED, amount_out=self._paid_in_trace(trace, tx), reason=SLIPPAGE)
            return TxStatus(TxState.REVERTED, reason=f"reverted on chain ({reason})")
        block = receipt["blockNumber"]
        would_pay = await self._amount_out(tx.amount_in, [tx.get("token_in"), tx.get("token_out")], block)
        if would_pay < tx.min_amount_out:
            return TxStatus(TxState.REVERTED, amount_out=would_pay, reason=SLIPPAGE)
        mined = await rpc("eth_getBlockByNumber", self.chain.w3.eth.get_block(block))
        if int(mined["timestamp"]) > int(tx.get("deadline")):
            return TxStatus(TxState.REVERTED, reason=f"deadline passed ({_EXPIRED_REVERT})")
        return TxStatus(TxState.REVERTED, reason=f"reverted on chain in block {block}")

    async def _trace(self, tx: SwapTx) -> dict[str, Any] | None:
        """The node's call trace of ``tx``; None where the node has no such method."""
        answer = await rpc("debug_traceTransaction", self.chain.w3.provider.make_request(
            RPCEndpoint("debug_traceTransaction"), [tx.tx_hash, {"tracer": "callTracer"}]))
        result = answer.get("result") if isinstance(answer, dict) else None
        return result if isinstance(result, dict) else None

    def _paid_in_trace(self, trace: dict[str, Any], tx: SwapTx) -> int | None:
        """What the swap would have paid at its place in the block: the pair's
        reserves the router read (its getReserves STATICCALL in ``trace``) through
        UniswapV2Library.getAmountOut (Uniswap V2's 0.3% fee); None if not found."""
        pair = tx.get("pair").lower()
        for call in trace.get("calls") or ():
            output = str(call.get("output") or "")
            if str(call.get("to", "")).lower() == pair and str(call.get("input", "")).startswith(self._get_reserves) \
                    and len(output) >= 2 + 128:
                reserve0, reserve1 = int(output[2:66], 16), int(output[66:130], 16)
                sold_first = int(tx.get("token_in"), 16) < int(tx.get("token_out"), 16)
                reserve_in, reserve_out = (reserve0, reserve1) if sold_first else (reserve1, reserve0)
                with_fee = tx.amount_in * 997
                return with_fee * reserve_out // (reserve_in * 1000 + with_fee)
        return None


def make_evm_venues(chain: EvmChain) -> dict[str, EvmVenue]:
    """A venue per router of the chain file, by name."""
    return {
        name: EvmVenue(name, chain, router, factory)
        for name, (router, factory) in sorted(chain.chain.venues.items())
    }
