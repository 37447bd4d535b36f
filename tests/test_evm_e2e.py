"""End to end on the devnet: web -> Redis -> worker -> anvil with the real Uniswap V2
contracts. The chain is the ledger of exactly-once: every confirmed order's tx_hash
has a receipt with status 1 and a Swap event paying its amount_out, and the wallet's
balances change by exactly the confirmed orders' amounts in and out.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from eth_account import Account
from redis.asyncio import Redis
from tornado.httpclient import AsyncHTTPClient

from engine.core import amounts, keys
from engine.core.status import Order
from engine.ops.devnet_keys import WALLET_KEY
from tests.evm_market import DevnetMarket
from tests.faults.cluster import Cluster, connections, start_web
from tests.helpers import AUTH_HEADERS, eventually
from tests.test_faults import wait_finished

WALLET = Account.from_key(WALLET_KEY).address
# Sizes (whole tokens) small against the devnet's pools and the wallet's funds.
SIZES = {"SOL": (0.05, 3), "USDC": (10, 600), "USDT": (10, 600), "BONK": (100_000, 20_000_000),
         "JUP": (10, 700), "RAY": (3, 200)}


def evm_env(devnet: Any, root: Path) -> dict[str, str]:
    chain_file = root / "chain.json"
    chain_file.write_text(json.dumps(devnet.doc))
    return {"MARKET": "evm", "EVM_RPC_URL": devnet.url, "EVM_CHAIN_FILE": str(chain_file),
            "EVM_PRIVATE_KEY": WALLET_KEY, "CONFIRMATIONS": "1"}


def orders(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    symbols = sorted(SIZES)
    out = []
    for _ in range(count):
        sold, bought = rng.sample(symbols, 2)
        low, high = SIZES[sold]
        token = amounts.token(sold)
        amount = Decimal(str(rng.uniform(low, high))).quantize(token.unit)
        out.append({"order_type": "market", "token_in": sold, "token_out": bought,
                    "amount": amount, "max_slippage": rng.choice([0.01, 0.03, 0.05])})
    return out


async def submit(http: AsyncHTTPClient, base_url: str, batch: list[dict[str, Any]]) -> list[str]:
    async def one(order: dict[str, Any]) -> str:
        # Exact amounts: a Decimal goes out as its own digits, never through a float.
        body = json.dumps({**order, "amount": "AMOUNT"}).replace('"AMOUNT"', str(order["amount"]))
        response = await http.fetch(f"{base_url}/api/orders/execute", method="POST", body=body,
                                    headers={"Content-Type": "application/json", **AUTH_HEADERS},
                                    raise_error=False)
        assert response.code == 202, response.body
        return str(json.loads(response.body)["order_id"])

    return list(await asyncio.gather(*(one(o) for o in batch)))


async def load_orders(redis: Redis, order_ids: list[str]) -> list[Order]:
    found = []
    for order_id in order_ids:
        data = cast(dict[str, str], await redis.hgetall(keys.order(order_id)))
        found.append(Order.from_hash(data))
    return found


def check_against_chain(market: DevnetMarket, finished: list[Order], before: dict[str, int]) -> Counter[str]:
    """Every confirmed order is on chain exactly as reported; the wallet's balances
    moved by exactly the confirmed orders' amounts. The outcomes, counted."""
    expected = Counter[str]()
    outcomes = Counter[str]()
    for order in finished:
        outcomes[order.status] += 1
        request = order.parsed_request()
        if order.status == "confirmed":
            assert order.tx_hash and order.amount_out is not None
            receipt = market.w3.eth.get_transaction_receipt(order.tx_hash)  # type: ignore[arg-type]
            assert receipt["status"] == 1
            paid = request.token_out.to_base_units(order.amount_out)
            assert market.swap_paid(receipt, request.token_out.symbol) == paid
            expected[request.token_in.symbol] -= request.amount_in
            expected[request.token_out.symbol] += paid
        else:
            assert order.status == "failed" and order.reason
            if order.tx_hash:  # sent and reverted: no tokens moved
                assert market.w3.eth.get_transaction_receipt(order.tx_hash)["status"] == 0  # type: ignore[arg-type]
    for symbol in SIZES:
        assert market.balance(symbol, WALLET) - before[symbol] == expected[symbol], symbol
    # No nonce gap: everything the wallet signed is mined.
    assert market.w3.eth.get_transaction_count(WALLET, "pending") == market.w3.eth.get_transaction_count(
        WALLET, "latest")
    return outcomes


@pytest.mark.parametrize("workers", [1, 2])
async def test_orders_execute_once_on_chain(devnet: Any, cluster: Cluster, workers: int) -> None:
    market = DevnetMarket(devnet.url, devnet.doc)
    env = evm_env(devnet, cluster.root)
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        for _ in range(workers):
            await cluster.wait_worker_ready(cluster.start_worker(**env, WORKER_CONCURRENCY="32"), redis)
        before = {symbol: market.balance(symbol, WALLET) for symbol in SIZES}
        order_ids = await submit(http, web.base_url, orders(24, seed=workers))
        await wait_finished(redis, order_ids, cluster)
        outcomes = check_against_chain(market, await load_orders(redis, order_ids), before)
        assert outcomes["confirmed"] >= 20, outcomes  # no trader: slippage is rare
        # Redis's next free nonce is the chain's: every recorded nonce was mined.
        genesis = market.w3.eth.get_block(0)["hash"].to_0x_hex()
        nonce_key = keys.next_nonce(f"31337:{genesis[2:18]}", WALLET)
        assert int(await redis.get(nonce_key) or 0) == market.w3.eth.get_transaction_count(WALLET)
        # The key signed all that, and appears in no log line, metric or status.
        metrics = (await http.fetch(f"{web.base_url}/metrics")).body.decode()
        histories = [data for oid in order_ids for _, data in cast(Any, await redis.xrange(keys.order_events(oid)))]
        for text in (cluster.logs(), metrics, json.dumps(histories)):
            assert WALLET_KEY[2:].lower() not in text.lower()


async def test_a_pool_moved_between_quote_and_inclusion_fails_the_order_with_the_seed_s_reason(
    devnet: Any, cluster: Cluster
) -> None:
    market = DevnetMarket(devnet.url, devnet.doc)
    env = evm_env(devnet, cluster.root)
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        await cluster.wait_worker_ready(cluster.start_worker(**env), redis)
        market.approve_other("uniswap_v2", "SOL")
        market.approve_other("sushiswap", "SOL")
        before = {symbol: market.balance(symbol, WALLET) for symbol in SIZES}
        market.automine(False)
        try:
            [order_id] = await submit(http, web.base_url, [
                {"order_type": "market", "token_in": "SOL", "token_out": "USDC", "amount": 1, "max_slippage": 0.01}])

            async def submitted() -> dict[str, str] | None:
                data = cast(dict[str, str], await redis.hgetall(keys.order(order_id)))
                return data if data.get("status") == "submitted" else None

            sent = await eventually(submitted, timeout=30, message="the swap is in the mempool")
            # Another account's trade lands first in the same block (a higher tip).
            market.move_price(sent["venue"], "SOL", "USDC", 0.97)
            market.mine()
        finally:
            market.automine(True)
        await wait_finished(redis, [order_id], cluster)
        [order] = await load_orders(redis, [order_id])
        assert order.status == "failed" and order.reason
        assert order.reason.startswith("Price moved ") and order.reason.endswith("(max allowed: 1.0%)")
        receipt = market.w3.eth.get_transaction_receipt(order.tx_hash)  # type: ignore[arg-type]
        assert receipt["status"] == 0
        check_against_chain(market, [order], before)
