"""Open-loop HTTP load generator: POSTs on a fixed timetable over keep-alive connections.

Run as its own process (``python -m bench.httpgen ...``; ``bench.run`` starts one or
more). Request *i* of process *p* (of *P*) is due at ``start + (i*P + p) / rate``
whatever happened to earlier requests, so the processes together offer exactly
``rate`` requests per second. Latency is measured from that *scheduled* time, not
from when the request was actually written: a stall in the server (or in this
generator) shows up as latency instead of silently lowering the offered load (no
coordinated omission).

Each connection carries one request at a time (no pipelining). When every
connection is busy a due request waits in a queue, and the wait is part of its
latency. ``send_lag`` (actual write time minus scheduled time) and
``dispatch_lag`` (how late the timetable loop itself ran) say whether the
generator kept up: a large dispatch lag means this process, not the server, was
short of CPU. The timetable wakes through a timerfd (bench.timer), so an idle
generator sends within ~0.1 ms of the due time rather than asyncio's ~1 ms.

Every run is bounded: ``rate * duration`` requests, then at most ``drain`` seconds
waiting for the last responses; whatever has not answered by then counts as a
timeout. The result (raw latencies included) is written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from bench import http11
from bench.timer import PreciseSleeper

# A valid order: what a client of the service sends.
ORDER_BODY = json.dumps(
    {"token_in": "SOL", "token_out": "USDC", "amount": 1.5, "order_type": "market",
     "max_slippage": 0.05},
    separators=(",", ":"),
).encode()
TIMEOUT_STATUS = 0  # recorded for a request that got no response within the drain time


class OpenLoopGenerator:
    """Offers ``count`` requests on a timetable over a fixed pool of connections."""

    def __init__(
        self, host: str, port: int, raw_request: bytes, *, rate: float, count: int,
        start_at: float, index: int, procs: int, connections: int, drain_secs: float,
    ) -> None:
        self.host, self.port = host, port
        self.raw_request = raw_request
        self.interval = procs / rate
        self.first_due = start_at + index / rate
        self.count = count
        self.connections = connections
        self.drain_secs = drain_secs
        self.scheduled = [0.0] * count
        self.sent = [0.0] * count
        self.done = [0.0] * count
        self.status = [TIMEOUT_STATUS] * count
        self.dispatch_lag = [0.0] * count
        self.idle: deque[http11.HTTPConnection] = deque()
        self.queue: deque[int] = deque()
        self.completed = 0
        self.connection_losses = 0
        self.all_done = asyncio.Event()

    async def open_pool(self) -> None:
        pool = await asyncio.gather(
            *(http11.connect(self.host, self.port) for _ in range(self.connections))
        )
        self.idle.extend(pool)

    async def run(self) -> None:
        """Offer every request on time, then wait (bounded) for the responses."""
        if self.count == 0:
            return
        sleeper = PreciseSleeper()
        i = 0
        while i < self.count:
            now = time.monotonic()
            due = self.first_due + i * self.interval
            if due > now:
                await sleeper.until(due)
                continue
            # Everything due by now goes out in this pass (a late wake-up sends a burst).
            while i < self.count and self.first_due + i * self.interval <= now:
                due = self.first_due + i * self.interval
                self.scheduled[i] = due
                self.dispatch_lag[i] = now - due
                self._submit(i)
                i += 1
        sleeper.close()
        try:
            await asyncio.wait_for(self.all_done.wait(), self.drain_secs)
        except TimeoutError:
            pass
        for conn in list(self.idle):
            conn.close()

    def _submit(self, i: int) -> None:
        while self.idle:
            conn = self.idle.popleft()
            if conn.is_open:
                self._send(conn, i)
                return
        self.queue.append(i)

    def _send(self, conn: http11.HTTPConnection, i: int) -> None:
        self.sent[i] = time.monotonic()

        def on_response(status: int, _body: bytes) -> None:
            self.done[i] = time.monotonic()
            self.status[i] = status
            self.completed += 1
            if status == http11.CONNECTION_LOST:
                self.connection_losses += 1
            elif self.queue:
                self._send(conn, self.queue.popleft())
            else:
                self.idle.append(conn)
            if self.completed == self.count:
                self.all_done.set()

        conn.send(self.raw_request, on_response)

    def result(self, cpu_secs: float) -> dict[str, Any]:
        answered = [i for i in range(self.count) if self.status[i] > 0]
        return {
            "count": self.count,
            "first_due": self.first_due,
            "last_due": self.first_due + (self.count - 1) * self.interval if self.count else 0.0,
            "last_done": max((self.done[i] for i in answered), default=0.0),
            "status_counts": dict(Counter(str(s) for s in self.status)),
            "latencies_ms": [(self.done[i] - self.scheduled[i]) * 1000 for i in answered],
            "send_lag_ms": [(self.sent[i] - self.scheduled[i]) * 1000 for i in answered],
            "dispatch_lag_ms": [lag * 1000 for lag in self.dispatch_lag],
            "connection_losses": self.connection_losses,
            "cpu_secs": cpu_secs,
        }


def _cpu_secs() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    body = ORDER_BODY if args.method == "POST" else b""
    raw = http11.build_request(args.method, args.host, args.port, args.path, body, headers=args.header)
    count = int(args.rate * args.duration) // args.procs
    gen = OpenLoopGenerator(
        args.host, args.port, raw, rate=args.rate, count=count,
        start_at=args.start_at or time.monotonic() + 0.2, index=args.index, procs=args.procs,
        connections=args.connections, drain_secs=args.drain,
    )
    await gen.open_pool()
    # No collection of the generator's own may stall it mid-run (it measured ~30
    # young collections of up to 0.5 ms in 8,000 requests): each would be charged
    # to the server as latency. The run is bounded, so its garbage is too.
    gc.collect()
    gc.disable()
    cpu_before = _cpu_secs()
    try:
        await gen.run()
    finally:
        gc.enable()
    return gen.result(_cpu_secs() - cpu_before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="POST", choices=("POST", "GET"))
    parser.add_argument("--path", default="/api/orders/execute")
    parser.add_argument("--rate", type=float, required=True, help="req/s offered by all processes")
    parser.add_argument("--duration", type=float, required=True, help="seconds of timetable")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive pool size")
    parser.add_argument("--index", type=int, default=0, help="this process's index")
    parser.add_argument("--procs", type=int, default=1, help="generator processes in all")
    parser.add_argument("--start-at", type=float, default=0.0,
                        help="time.monotonic() of the first request (shared by all processes)")
    parser.add_argument("--drain", type=float, default=5.0, help="max wait for late responses")
    parser.add_argument("--header", action="append", default=[],
                        help="one more header line (Name: value) on every request; repeatable")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    http11.require_loopback(args.host)
    result = asyncio.run(main_async(args))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
