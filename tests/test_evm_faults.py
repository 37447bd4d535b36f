"""Real-chain faults (issue 15), judged by the chain itself: the real processes (web,
workers, Redis with ``appendfsync always``) on the devnet with the real Uniswap V2
contracts, 1 s blocks and ``CONFIRMATIONS=2``, so at any moment orders are building,
recorded, broadcast and not mined, mined and not yet deep enough. After each fault:
every order ended ``confirmed`` or ``failed`` along a valid path, the wallet's
balances moved by exactly the confirmed orders' amounts (nothing executed twice), and
its pending nonce equals its mined nonce (no gap). ``SOAK=1`` runs more orders.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from redis.asyncio import Redis
from web3.exceptions import TransactionNotFound

from engine.core.status import Order
from engine.ops.devnet import Anvil, deploy
from engine.ops.redis_server import free_port
from tests.evm_market import DevnetMarket
from tests.faults import scaled
from tests.faults.audit import histories, statuses_now, valid_path
from tests.faults.cluster import Cluster, ServiceProcess, WebProcess, connections, start_web
from tests.helpers import AUTH_HEADERS, eventually
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
        # (A thawed worker changes a status only while the entry is still its own:
        # checked in the transition's own atomic step, tests/test_store.py. Under
        # this load an entry may pass back and forth between the two workers as
        # their lease refreshes lag; every history above is still each status once.)
        assert outcomes["confirmed"] + outcomes["failed"] == ORDERS


async def test_a_reorg_before_the_swap_is_deep_enough_resends_it_and_it_executes_once(
    devnet: Any, cluster: Cluster
) -> None:
    # The swap is mined (1 block deep, CONFIRMATIONS=2), then that block is rolled
    # back: the order is not confirmed early, the worker sends the same bytes again,
    # and the swap executes once, in the block that counts.
    market = DevnetMarket(devnet.url, devnet.doc)
    env = {**evm_env(devnet, cluster.root), "CONFIRMATIONS": "2"}
    async with connections(cluster) as (redis, http):
        held = await _hold_one_swap(cluster, market, env, redis, http, seed=99)
        order_id, status, order, before = held.order_id, held.status, held.order, held.before
        try:
            first_block = market.w3.eth.block_number + 1
            market.mine()
            receipt = market.w3.eth.get_transaction_receipt(order.tx_hash)  # type: ignore[arg-type]
            assert receipt["blockNumber"] == first_block
            await _stays(status, "submitted", 1.5)  # 1 block deep of 2: not confirmed
            market.rpc("anvil_rollback", 1)  # the block is gone, and the swap with it
            assert market.w3.eth.block_number == first_block - 1
            # The worker finds no receipt, sends the recorded bytes again.
            await eventually(lambda: _in_mempool(market, order.tx_hash or ""), timeout=30,
                             message="the swap sent again")
            market.mine()
            market.mine()
        finally:
            market.automine(True)
        await wait_finished(redis, [order_id], cluster)
        [done] = await load_orders(redis, [order_id])
        assert done.status == "confirmed" and done.tx_hash == order.tx_hash
        check_against_chain(market, [done], before)  # its amounts, once
        assert "sending it again" in cluster.logs()  # by the worker: the node dropped it


@pytest.mark.parametrize("stall_secs", [3, 12])
async def test_a_stalled_node_delays_orders_and_loses_or_doubles_none(
    devnet: Any, cluster: Cluster, stall_secs: int
) -> None:
    # The node freezes (SIGSTOP) with orders in flight, for less and for more than
    # one JSON-RPC timeout (10 s), then comes back: transient errors are retried,
    # nothing is sent twice, every order finishes.
    market = DevnetMarket(devnet.url, devnet.doc)
    env = evm_env(devnet, cluster.root)
    count = scaled(20, 100)
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http, MARKET="evm")  # (the web needs no key, no node)
        await cluster.wait_worker_ready(cluster.start_worker(**env), redis)
        before = {symbol: market.balance(symbol, WALLET) for symbol in SIZES}
        order_ids = await submit(http, web.base_url, orders(count, seed=stall_secs))
        await eventually(lambda: progressed(redis, order_ids, 0.2), timeout=60, interval=0.02,
                         message="orders under way")
        assert (await readyz(http, web.base_url))["chain"]["status"] == "ok"
        anvil = devnet.anvil.process
        anvil.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(stall_secs - 1)
            during = await readyz(http, web.base_url)
            await asyncio.sleep(1)
        finally:
            anvil.send_signal(signal.SIGCONT)
        if stall_secs > 11:  # past the health record's 10 s: nobody has seen the node lately
            assert during == {"status": "ready", "chain": {"status": "unknown"}}
        await wait_finished(redis, order_ids, cluster)

        async def seen_again() -> bool:
            return bool((await readyz(http, web.base_url))["chain"]["status"] == "ok")

        await eventually(seen_again, timeout=15, interval=0.2, message=f"/readyz sees the node again\n{cluster.logs()[-3000:]}")
        outcomes = check_against_chain(market, await load_orders(redis, order_ids), before)
        print(f"stall {stall_secs} s: {count} orders, outcomes {dict((str(k), v) for k, v in outcomes.items())}")
        assert outcomes["confirmed"] + outcomes["failed"] == count


async def _one_order_out(http: Any, base_url: str, redis: Redis, seed: int) -> tuple[str, Any]:
    """POST one order and wait until its swap is out (``submitted``); its id, and a
    coroutine function reading its status."""
    [order_id] = await submit(http, base_url, orders(1, seed=seed))

    async def status() -> str:
        return str((await statuses_now(redis, [order_id]))[order_id])

    await eventually(lambda: _is(status, "submitted"), timeout=30, message="the swap is out")
    return order_id, status


@dataclasses.dataclass
class HeldSwap:
    """A web process and a worker, the wallet's balances before, and one order whose
    swap is out and held unmined (automine off: the test mines, then turns it on)."""

    web: WebProcess
    before: dict[str, int]
    order_id: str
    status: Any  # a coroutine function reading the order's status
    order: Order


async def _hold_one_swap(
    cluster: Cluster, market: DevnetMarket, env: dict[str, str], redis: Redis, http: Any, *, seed: int
) -> HeldSwap:
    web = await start_web(cluster, http)
    await cluster.wait_worker_ready(cluster.start_worker(**env), redis)
    before = {symbol: market.balance(symbol, WALLET) for symbol in SIZES}
    market.automine(False)
    try:
        order_id, status = await _one_order_out(http, web.base_url, redis, seed=seed)
        [order] = await load_orders(redis, [order_id])
    except BaseException:
        market.automine(True)
        raise
    return HeldSwap(web, before, order_id, status, order)


async def readyz(http: Any, base_url: str) -> dict[str, Any]:
    response = await http.fetch(f"{base_url}/readyz", raise_error=False)
    assert response.code == 200, response.body
    answer: dict[str, Any] = json.loads(response.body)
    return answer


async def _is(status: Any, wanted: str) -> bool:
    return bool(await status() == wanted)


async def _stays(status: Any, wanted: str, secs: float) -> None:
    deadline = asyncio.get_running_loop().time() + secs
    while asyncio.get_running_loop().time() < deadline:
        assert await status() == wanted
        await asyncio.sleep(0.1)


def _in_mempool(market: DevnetMarket, tx_hash: str) -> bool:
    try:
        found = market.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
    except Exception:  # TransactionNotFound
        return False
    return found["blockNumber"] is None


@pytest.mark.parametrize("how", ["base_fee_jump", "unmined"])
async def test_a_stuck_swap_is_replaced_and_lands_once(devnet: Any, cluster: Cluster, how: str) -> None:
    # base_fee_jump: the base fee jumps past the swap's fee cap right after it is
    # sent: it cannot be mined (anvil drops it; geth would keep it waiting). unmined:
    # no block comes for longer than TX_STUCK_SECS. Either way the worker replaces it
    # (same nonce, higher fees); the replacement lands, the order is confirmed with
    # it, and GET shows both hashes. Executed once (balances), no nonce gap.
    market = DevnetMarket(devnet.url, devnet.doc)
    env = {**evm_env(devnet, cluster.root), "TX_STUCK_SECS": "2"}
    async with connections(cluster) as (redis, http):
        held = await _hold_one_swap(cluster, market, env, redis, http, seed=7)
        web, order_id, sent, before = held.web, held.order_id, held.order, held.before
        try:
            stuck = market.w3.eth.get_transaction(sent.tx_hash)  # type: ignore[arg-type]
            high = 4 * int(stuck["maxFeePerGas"]) if how == "base_fee_jump" else int(stuck["maxFeePerGas"])
            if how == "base_fee_jump":
                market.rpc("anvil_setNextBlockBaseFeePerGas", hex(high))
                market.mine()  # a block at the high base fee, without the swap (anvil drops it)
            with pytest.raises(TransactionNotFound):
                market.w3.eth.get_transaction_receipt(sent.tx_hash)  # type: ignore[arg-type]

            async def replaced() -> bool:
                [order] = await load_orders(redis, [order_id])
                return order.tx_hashes is not None and len(order.tx_hashes) == 2

            await eventually(replaced, timeout=30, interval=0.2, message=f"the swap replaced\n{cluster.logs()[-2000:]}")
            market.mine()
            market.mine()
        finally:
            market.rpc("anvil_setNextBlockBaseFeePerGas", hex(10**9))
            market.automine(True)
        await wait_finished(redis, [order_id], cluster)
        [done] = await load_orders(redis, [order_id])
        assert done.status == "confirmed" and done.tx_hashes is not None
        first, second = done.tx_hashes
        assert first == sent.tx_hash and done.tx_hash == second
        landed = market.w3.eth.get_transaction(second)  # type: ignore[arg-type]
        assert landed["nonce"] == stuck["nonce"] and int(landed["maxFeePerGas"]) > high
        with pytest.raises(TransactionNotFound):  # the stuck one never executed
            market.w3.eth.get_transaction_receipt(first)  # type: ignore[arg-type]
        view = json.loads((await http.fetch(f"{web.base_url}/api/orders/{order_id}",
                                             headers=AUTH_HEADERS)).body)
        assert view["tx_hashes"] == [first, second] and view["tx_hash"] == second
        assert view["history"][-1]["tx_hash"] == second
        check_against_chain(market, [done], before)  # once, and no nonce gap


async def test_a_node_restarted_from_its_state_dump_mid_flight_loses_or_doubles_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    # anvil stops (dumping its chain to --state) with orders in flight, and starts
    # again from the dump on the same port. Transactions it held unmined are gone
    # with it: the worker finds them unknown and sends the recorded bytes again.
    state = tmp_path / "anvil-state.json"
    anvil = Anvil(free_port(), data_dir=tmp_path / "anvil", state_path=state)
    anvil.start()
    try:
        doc = deploy(anvil.url)
        node = SimpleNamespace(url=anvil.url, doc=doc)
        market = DevnetMarket(anvil.url, doc)
        env = {**evm_env(node, cluster.root), "CONFIRMATIONS": "2"}
        count = scaled(20, 100)
        async with connections(cluster) as (redis, http):
            web = await start_web(cluster, http)
            await cluster.wait_worker_ready(cluster.start_worker(**env), redis)
            before = {symbol: market.balance(symbol, WALLET) for symbol in SIZES}
            market.rpc("evm_setIntervalMining", 1)
            order_ids = await submit(http, web.base_url, orders(count, seed=5))
            await eventually(lambda: progressed(redis, order_ids, 0.3), timeout=60, interval=0.05,
                             message="orders under way")
            at_restart = await breakdown(redis, order_ids)
            anvil.stop()  # SIGTERM: anvil writes its chain to the state file
            assert state.exists()
            await asyncio.sleep(1)
            anvil.start()
            market.rpc("evm_setIntervalMining", 1)
            await wait_finished(redis, order_ids, cluster)
            outcomes = check_against_chain(market, await load_orders(redis, order_ids), before)
            resent = cluster.logs().count("sending it again")
            print(f"node restart: {count} orders, at the restart {at_restart}, resent {resent}, "
                  f"outcomes {dict((str(k), v) for k, v in outcomes.items())}")
            assert outcomes["confirmed"] + outcomes["failed"] == count
    finally:
        anvil.stop()


async def test_a_swap_mined_but_not_yet_deep_is_waited_for_not_replaced(devnet: Any, cluster: Cluster) -> None:
    # Mined one block deep of three, and no block for longer than TX_STUCK_SECS: the
    # swap is executing, not stuck. No replacement (it could only fail, and cost).
    market = DevnetMarket(devnet.url, devnet.doc)
    env = {**evm_env(devnet, cluster.root), "TX_STUCK_SECS": "1", "CONFIRMATIONS": "3"}
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        await cluster.wait_worker_ready(cluster.start_worker(**env), redis)
        market.automine(False)
        try:
            order_id, status = await _one_order_out(http, web.base_url, redis, seed=11)
            market.mine()
            await _stays(status, "submitted", 3.0)  # 3 × TX_STUCK_SECS, 1 block deep of 3
            [waiting] = await load_orders(redis, [order_id])
            assert waiting.tx_hashes is not None and len(waiting.tx_hashes) == 1
            market.mine()
            market.mine()
        finally:
            market.automine(True)
        await wait_finished(redis, [order_id], cluster)
        [done] = await load_orders(redis, [order_id])
        assert done.status == "confirmed" and done.tx_hashes == (done.tx_hash,)
        assert "replaced by" not in cluster.logs()


class _HoldingProxy:
    """A JSON-RPC proxy in front of the devnet's node that can hold every
    ``eth_sendRawTransaction`` (never forwarding it): a worker killed while one is
    held died after recording its transaction and before broadcasting it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.hold = False
        self.held = 0
        self.server: Any = None
        self.port = free_port()

    def start(self) -> str:
        from tornado.httpclient import AsyncHTTPClient
        from tornado.httpserver import HTTPServer
        from tornado.web import Application, RequestHandler

        proxy = self

        class Forward(RequestHandler):
            async def post(self) -> None:
                body = self.request.body
                if proxy.hold and b"eth_sendRawTransaction" in body:
                    proxy.held += 1
                    await asyncio.Event().wait()  # until the client goes away
                answer = await AsyncHTTPClient().fetch(proxy.upstream, method="POST", body=body,
                                                       headers={"Content-Type": "application/json"})
                self.set_header("Content-Type", "application/json")
                self.finish(answer.body)

        self.server = HTTPServer(Application([(r"/", Forward)]))
        self.server.listen(self.port, "127.0.0.1")
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.mark.parametrize("point", ["recorded_not_broadcast", "broadcast_not_mined", "mined_not_deep"])
async def test_a_worker_killed_at_each_point_of_a_swap_leaves_it_executed_once(
    devnet: Any, cluster: Cluster, point: str
) -> None:
    # kill -9 of the worker (a) after the swap is recorded, before it is broadcast
    # (a proxy holds the broadcast); (b) after the broadcast, before it is mined
    # (no block); (c) after it is mined, before it is CONFIRMATIONS deep. Another
    # worker finishes the order: confirmed once, no nonce gap.
    market = DevnetMarket(devnet.url, devnet.doc)
    proxy = _HoldingProxy(devnet.url)
    proxied = proxy.start()
    env = {**evm_env(devnet, cluster.root), "CONFIRMATIONS": "2", "EVM_RPC_URL": proxied}
    try:
        async with connections(cluster) as (redis, http):
            web = await start_web(cluster, http)
            first = cluster.start_worker(**env)
            await cluster.wait_worker_ready(first, redis)
            before = {symbol: market.balance(symbol, WALLET) for symbol in SIZES}
            proxy.hold = point == "recorded_not_broadcast"
            if point != "recorded_not_broadcast":
                market.automine(False)
            try:
                [order_id] = await submit(http, web.base_url, orders(1, seed=13))

                async def recorded() -> bool:
                    [order] = await load_orders(redis, [order_id])
                    return order.tx_hash is not None

                async def status() -> str:
                    return str((await statuses_now(redis, [order_id]))[order_id])

                if point == "recorded_not_broadcast":
                    await eventually(lambda: proxy.held >= 1, timeout=30, message="the broadcast held")
                    assert await recorded() and await status() == "building"
                else:
                    await eventually(lambda: _is(status, "submitted"), timeout=30, message="the swap is out")
                    if point == "mined_not_deep":
                        market.mine()  # 1 block deep of 2
                        [order] = await load_orders(redis, [order_id])
                        assert market.w3.eth.get_transaction_receipt(order.tx_hash)["status"] == 1  # type: ignore[arg-type]
                first.kill()
                proxy.hold = False
                market.automine(True)
                await cluster.wait_worker_ready(cluster.start_worker(**env), redis)
                if point != "recorded_not_broadcast":
                    market.mine()
            finally:
                market.automine(True)

            async def finished() -> bool:
                if await status() in ("confirmed", "failed"):
                    return True
                market.mine()  # automine mines only on transactions: make depth
                return False

            await eventually(finished, timeout=60, interval=0.3, message="the order finished")
            [done] = await load_orders(redis, [order_id])
            assert done.status == "confirmed" and done.tx_hashes == (done.tx_hash,)
            check_against_chain(market, [done], before)  # once, no nonce gap
    finally:
        proxy.stop()
