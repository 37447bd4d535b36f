"""Real-chain faults (issue 15), judged by the chain itself: the real processes (web,
workers, Redis with ``appendfsync always``) on the devnet with the real Uniswap V2
contracts, 1 s blocks and ``CONFIRMATIONS=2``, so at any moment orders are building,
recorded, broadcast and not mined, mined and not yet deep enough. After each fault:
every order ended ``confirmed`` or ``failed`` along a valid path, the wallet's
balances moved by exactly the confirmed orders' amounts (nothing executed twice), and
its pending nonce equals its mined nonce (no gap). ``SOAK=1`` runs more orders.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.evm_market import DevnetMarket
from tests.faults import scaled
from tests.faults.audit import histories, statuses_now, valid_path
from tests.faults.cluster import Cluster, ServiceProcess, connections, start_web
from tests.helpers import eventually
from tests.test_evm_e2e import SIZES, WALLET, check_against_chain, evm_env, load_orders, orders, submit
from tests.test_faults import wait_finished

pytestmark = pytest.mark.slow

ORDERS = scaled(30, 200)
# Past the first third of the orders: some building, some out, some mined.
KILL_AT = 1 / 3


@pytest.fixture
def slow_blocks(devnet: Any) -> Iterator[DevnetMarket]:
    """The session's devnet with a block a second instead of one per transaction."""
    market = DevnetMarket(devnet.url, devnet.doc)
    market.rpc("evm_setIntervalMining", 1)
    yield market
    market.rpc("evm_setIntervalMining", 0)
    market.automine(True)


async def progressed(redis: Redis, order_ids: list[str], share: float) -> bool:
    current = await statuses_now(redis, order_ids)
    moved = sum(1 for status in current.values() if status in ("submitted", "confirmed", "failed"))
    return moved >= share * len(order_ids)


async def breakdown(redis: Redis, order_ids: list[str]) -> dict[str, int]:
    return dict(collections.Counter((await statuses_now(redis, order_ids)).values()))


@pytest.mark.parametrize("fault", ["kill", "freeze", "two_workers_each_killed"])
async def test_a_worker_fault_on_a_chain_loses_nothing_and_executes_nothing_twice(
    devnet: Any, cluster: Cluster, slow_blocks: DevnetMarket, fault: str
) -> None:
    market = slow_blocks
    env = {**evm_env(devnet, cluster.root), "CONFIRMATIONS": "2", "WORKER_CONCURRENCY": "64"}
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)

        async def worker() -> ServiceProcess:
            process = cluster.start_worker(**env)
            await cluster.wait_worker_ready(process, redis)
            return process

        first = await worker()
        second = await worker() if fault == "two_workers_each_killed" else None
        before = {symbol: market.balance(symbol, WALLET) for symbol in SIZES}
        order_ids = await submit(http, web.base_url, orders(ORDERS, seed=len(fault)))
        await eventually(lambda: progressed(redis, order_ids, KILL_AT), timeout=60, interval=0.05,
                         message="orders under way")
        at_fault = await breakdown(redis, order_ids)
        if fault == "freeze":
            first.freeze()
            await worker()  # takes the frozen one's orders over after CLAIM_IDLE_MS
            await eventually(lambda: progressed(redis, order_ids, 2 / 3), timeout=60, interval=0.05,
                             message="the other worker took over")
            first.thaw()
        else:
            first.kill()
            await worker()
            if second is not None:
                await eventually(lambda: progressed(redis, order_ids, 2 / 3), timeout=60, interval=0.05,
                                 message="orders under way again")
                second.kill()
                await worker()
        await wait_finished(redis, order_ids, cluster)
        found = await histories(redis, order_ids)
        bad = [oid for oid, messages in found.items() if not valid_path([m["status"] for m in messages])]
        assert bad == [], {oid: [m["status"] for m in found[oid]] for oid in bad}
        outcomes = check_against_chain(market, await load_orders(redis, order_ids), before)
        print(f"{fault}: {ORDERS} orders, at the fault {at_fault}, outcomes {dict((str(k), v) for k, v in outcomes.items())}")
        assert outcomes["confirmed"] + outcomes["failed"] == ORDERS
