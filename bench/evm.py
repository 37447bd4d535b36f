"""End to end on the devnet (MARKET=evm): orders/s and POST -> ``confirmed`` latency
with the real Uniswap V2 contracts on anvil, with automine and with interval blocks.

    .venv/bin/python -m bench.evm                      # automine and 1 s blocks
    .venv/bin/python -m bench.evm --orders 300 --block-times 0 1 2

For each block time it starts a fresh Redis, anvil (deployed: engine.ops.devnet),
one web process and one worker, POSTs ``--orders`` orders with ``--concurrency``
clients at once, and waits for every order to finish. It reports the orders/s from
the first POST to the last terminal status, the POST -> ``confirmed`` latency from
the orders' own timestamps (``created_at`` -> ``updated_at``, both Redis's clock),
and the CPU seconds each process used per order, which tells whether the chain
(anvil) or the service (web, worker) is the limit. No trader runs: every failure is
the service's. Writes ``bench/out/evm.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from redis import Redis
from tornado.httpclient import AsyncHTTPClient

from bench.system import BENCH_API_KEY, System, cpu_secs
from engine.core import amounts, keys
from engine.core.config import PROJECT_ROOT
from engine.ops.devnet import Anvil, deploy, write_chain_file
from engine.ops.devnet_keys import WALLET_KEY
from engine.ops.redis_server import free_port

OUT = PROJECT_ROOT / "bench" / "out"
# Small trades against deep pools, so no order fails for slippage.
SIZES = {"SOL": Decimal("0.5"), "USDC": Decimal(100), "JUP": Decimal(50), "RAY": Decimal(20)}


def order_body(rng: random.Random) -> bytes:
    sold, bought = rng.sample(sorted(SIZES), 2)
    amount = (SIZES[sold] * Decimal(rng.uniform(0.5, 2))).quantize(amounts.token(sold).unit)
    return (f'{{"order_type":"market","token_in":"{sold}","token_out":"{bought}",'
            f'"amount":{amount},"max_slippage":0.05}}').encode()


async def submit(base_url: str, count: int, concurrency: int) -> tuple[list[str], float]:
    """POST ``count`` orders from ``concurrency`` clients; their ids and the start time."""
    http = AsyncHTTPClient()
    rng = random.Random(time.monotonic_ns())
    bodies = [order_body(rng) for _ in range(count)]
    ids: list[str] = []
    started = time.time()

    async def client() -> None:
        while bodies:
            response = await http.fetch(f"{base_url}/api/orders/execute", method="POST", body=bodies.pop(),
                                        headers={"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {BENCH_API_KEY}"})
            ids.append(json.loads(response.body)["order_id"])

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ids, started


def wait_terminal(redis: Redis, ids: list[str], timeout: float) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        pipe = redis.pipeline(transaction=False)
        for order_id in ids:
            pipe.hgetall(keys.order(order_id))
        orders: list[dict[str, str]] = pipe.execute()
        if all(o.get("status") in ("confirmed", "failed") for o in orders):
            return orders
        if time.monotonic() > deadline:
            raise TimeoutError("orders still unfinished")
        time.sleep(0.2)


async def one_at_a_time(base_url: str, redis: Redis, count: int) -> tuple[list[str], float]:
    """POST an order, wait until it is finished, then the next: latency unloaded."""
    ids: list[str] = []
    started = time.time()
    for _ in range(count):
        [order_id], _ = await submit(base_url, 1, 1)
        while redis.hget(keys.order(order_id), "status") not in ("confirmed", "failed"):
            await asyncio.sleep(0.01)
        ids.append(order_id)
    return ids, started


def run_one(system: System, block_time: float, count: int, concurrency: int) -> dict[str, Any]:
    anvil = Anvil(free_port(), block_time_secs=block_time, data_dir=system.out_dir / "logs" / f"anvil-{block_time:g}")
    anvil.start()
    try:
        system.redis_url = ""
        system.start_redis()
        chain_file = system.out_dir / "evm-chain.json"
        write_chain_file(deploy(anvil.url), chain_file)
        env = {"MARKET": "evm", "EVM_RPC_URL": anvil.url, "EVM_CHAIN_FILE": str(chain_file),
               "EVM_PRIVATE_KEY": WALLET_KEY, "CONFIRMATIONS": "1"}
        web = system.start_web("evm-web", env)
        worker = system.start_worker(env)
        redis = Redis.from_url(system.redis_url, decode_responses=True)
        deadline = time.monotonic() + 60
        while not redis.keys(keys.worker("*")):  # heartbeats once its approvals are mined
            if time.monotonic() > deadline or worker.proc.poll() is not None:
                raise RuntimeError(f"the worker did not start; see {worker.log}")
            time.sleep(0.1)
        pids = {"web": web.pid, "worker": worker.pid, "anvil": anvil.process.pid if anvil.process else 0}
        cpu_before = {name: cpu_secs(pid) for name, pid in pids.items()}
        base_url = f"http://127.0.0.1:{web.port}"
        if concurrency == 0:
            ids, started = asyncio.run(one_at_a_time(base_url, redis, count))
        else:
            ids, started = asyncio.run(submit(base_url, count, concurrency))
        orders = wait_terminal(redis, ids, timeout=120 + 3 * block_time * count)
        wall = max(float(o["updated_at"]) for o in orders) - started
        cpu = {name: round((cpu_secs(pid) - cpu_before[name]) / count * 1000, 2) for name, pid in pids.items()}
        latencies = sorted(float(o["updated_at"]) - float(o["created_at"]) for o in orders
                           if o["status"] == "confirmed")
        result = {
            "block_time_secs": block_time,
            "orders": count,
            "confirmed": len(latencies),
            "failed": sum(1 for o in orders if o["status"] == "failed"),
            "orders_per_sec": round(count / wall, 1),
            "confirmed_p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
            "confirmed_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1) if latencies else None,
            "cpu_ms_per_order": cpu,
            "cpu_share_of_wall": {name: round(ms * count / 1000 / wall, 2) for name, ms in cpu.items()},
        }
        redis.close()
        system.stop(worker)
        system.stop(web.child)
        return result
    finally:
        anvil.stop()
        system.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.evm", description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20,
                        help="clients POSTing at once; 0 = one order at a time, each waited for")
    parser.add_argument("--block-times", type=float, nargs="+", default=[0.0, 1.0],
                        help="seconds between blocks; 0 = automine")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    system = System(args.out, "always")  # MARKET=evm refuses anything less (EvmChain.check_durability)
    results = []
    for block_time in args.block_times:
        result = {"concurrency": args.concurrency, **run_one(system, block_time, args.orders, args.concurrency)}
        print(json.dumps(result), flush=True)
        results.append(result)
    (args.out / "evm.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
