"""End-to-end load: POST an order, watch it on a WebSocket until its terminal status.

Run as its own process (``python -m bench.e2e_client ...``; ``bench.run`` starts a
few). ``--concurrency`` client tasks each loop: POST an order on their own keep-alive
connection, open ``/api/orders/status``, send the id, read every status until the
server closes the socket. That is a closed loop (at most ``concurrency`` orders in
flight per process), so the orders per second it reaches is the system's throughput
at that concurrency, and the POST -> terminal time is measured under that load.

Each order's statuses are checked as a client would: ``seq`` 1, 2, 3... without a
gap or repeat, one terminal status, then a close with 1000.

Bounded: ``--orders`` orders, and the whole run stops after ``--deadline`` seconds
(unfinished orders are reported as such). Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

from bench import http11
from bench.system import BENCH_AUTH_HEADER

TERMINAL = ("confirmed", "failed")
# An order that takes longer than this is recorded as timed out.
ORDER_TIMEOUT_SECS = 30.0
TOKENS_OUT = ("USDC", "USDT", "BONK", "JUP", "RAY")


def order_body(rng: random.Random) -> bytes:
    order = {
        "token_in": "SOL",
        "token_out": rng.choice(TOKENS_OUT),
        "amount": round(rng.uniform(0.1, 20.0), 3),
        "order_type": "market",
        "max_slippage": 0.05,
    }
    return json.dumps(order, separators=(",", ":")).encode()


async def watch(ws: WebSocketClientConnection, record: dict[str, Any]) -> None:
    """Read statuses until the server closes; fill ``record`` as they come."""
    expected_seq = 1
    while True:
        message = await ws.read_message()
        if message is None:
            break
        now = time.monotonic()
        data = json.loads(message)
        if "seq" not in data:
            record["error"] = data.get("error", "no seq")
            continue
        if data["seq"] != expected_seq:
            record["sequence_ok"] = False
        expected_seq = data["seq"] + 1
        record["messages"] += 1
        if record["first_message"] is None:
            record["first_message"] = now
        if data["status"] in TERMINAL:
            if record["terminal"] is not None:
                record["sequence_ok"] = False  # a second terminal status
            record["terminal"] = now
            record["final_status"] = data["status"]
    record["close_code"] = ws.close_code


async def one_order(conn: http11.HTTPConnection, port: int, body: bytes) -> dict[str, Any]:
    record: dict[str, Any] = {
        "start": time.monotonic(), "accepted": None, "first_message": None, "terminal": None,
        "final_status": None, "messages": 0, "sequence_ok": True, "close_code": None,
        "http_status": None, "error": None,
    }
    raw = http11.build_request("POST", "127.0.0.1", port, "/api/orders/execute", body,
                               headers=[BENCH_AUTH_HEADER])
    status, response = await http11.request(conn, raw)
    record["http_status"] = status
    if status != 202:
        record["error"] = f"HTTP {status}"
        return record
    record["accepted"] = time.monotonic()
    order_id = json.loads(response)["order_id"]
    ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/orders/status")
    try:
        await ws.write_message(order_id)
        await asyncio.wait_for(watch(ws, record), ORDER_TIMEOUT_SECS)
    except TimeoutError:
        record["error"] = "timeout"
    finally:
        ws.close()
    return record


async def run(
    port: int, orders: int, concurrency: int, start_at: float, seed: int,
    records: list[dict[str, Any]],
) -> None:
    """Run every order, appending one record per order to ``records`` as it ends."""
    rng = random.Random(seed)
    bodies = [order_body(rng) for _ in range(orders)]
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        conn = await http11.connect("127.0.0.1", port)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        try:
            while next_index < orders:
                index = next_index
                next_index += 1
                try:
                    records.append(await one_order(conn, port, bodies[index]))
                except (OSError, TimeoutError) as exc:
                    records.append({"start": time.monotonic(), "error": repr(exc)})
                if not conn.is_open:
                    conn = await http11.connect("127.0.0.1", port)
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(min(concurrency, orders))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--start-at", type=float, default=0.0, help="time.monotonic() to begin")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    usage_before = resource.getrusage(resource.RUSAGE_SELF)

    records: list[dict[str, Any]] = []

    async def bounded() -> None:
        await asyncio.wait_for(
            run(args.port, args.orders, args.concurrency, args.start_at, args.seed, records),
            args.deadline,
        )

    try:
        asyncio.run(bounded())
        timed_out = False
    except TimeoutError:
        timed_out = True  # the records of the orders that finished are kept
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    args.out.write_text(json.dumps({"records": records, "deadline_hit": timed_out, "cpu_secs": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
