"""Many idle status WebSockets, each subscribed to one order, timing what they receive.

Run as its own process (``python -m bench.fanout_client ...``) by ``bench.run``,
which drives it through stdin/stdout:

1. it opens one socket per order id in ``--ids`` (at most ``--connect-concurrency``
   handshakes at a time, so the server's listen backlog never overflows), sends the
   id, and waits for the order's first status (``pending``, replayed from history):
   from then on the socket is subscribed;
2. it prints ``READY <open> <failed>`` and records the arrival time
   (``time.monotonic()``, which on Linux is the same clock in every process) of
   every later message;
3. on a ``STOP`` line on stdin (or after ``--deadline`` seconds) it closes its
   sockets and writes ``[order_id, seq, status, arrival time]`` for each message to
   ``--out``, for the driver to match against the time it wrote each status.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

from bench import http11

# Longest wait for one socket's handshake and first message.
SUBSCRIBE_TIMEOUT_SECS = 30.0
CLOSE_GRACE_SECS = 2.0


class Watcher:
    """One socket; keeps every message with its arrival time."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.ws: WebSocketClientConnection | None = None
        self.messages: list[tuple[float, str]] = []
        self.subscribed = asyncio.get_running_loop().create_future()
        self.closed_by_peer = False

    def on_message(self, message: str | bytes | None) -> None:
        now = time.monotonic()
        if message is None:
            self.closed_by_peer = True
            if not self.subscribed.done():
                self.subscribed.set_exception(ConnectionError("closed before subscribing"))
            return
        text = message if isinstance(message, str) else message.decode()
        self.messages.append((now, text))
        if not self.subscribed.done():
            # Subscribed once the first status arrived; an error (then a close) is not.
            if '"seq"' in text:
                self.subscribed.set_result(None)
            else:
                self.subscribed.set_exception(ConnectionError(f"refused: {text[:200]}"))

    async def open(self, url: str) -> None:
        self.ws = await websocket_connect(url, on_message_callback=self.on_message)
        await self.ws.write_message(self.order_id)
        await self.subscribed


async def read_stdin_line() -> str:
    """The next line on stdin ("" at EOF), read without blocking the loop or a thread."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    line: asyncio.Future[str] = loop.create_future()
    buffer = bytearray()

    def on_readable() -> None:
        chunk = os.read(fd, 1024)
        buffer.extend(chunk)
        if (not chunk or b"\n" in buffer) and not line.done():
            line.set_result(buffer.split(b"\n", 1)[0].decode().strip())

    loop.add_reader(fd, on_readable)
    try:
        return await line
    finally:
        loop.remove_reader(fd)


async def run(args: Any, watchers: list[Watcher]) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{args.port}/api/orders/status"
    gate = asyncio.Semaphore(args.connect_concurrency)
    errors: dict[str, int] = {}

    async def open_one(watcher: Watcher) -> bool:
        async with gate:
            try:
                await asyncio.wait_for(watcher.open(url), SUBSCRIBE_TIMEOUT_SECS)
                return True
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return False

    started = time.monotonic()
    results = await asyncio.gather(*(open_one(w) for w in watchers))
    connect_secs = time.monotonic() - started
    opened = sum(results)
    # No cyclic GC while timing: a full collection over thousands of connections takes
    # long enough to show up as delivery delay that is this client's, not the server's.
    gc.collect()
    gc.freeze()
    gc.disable()
    print(f"READY {opened} {len(watchers) - opened}", flush=True)

    try:
        stop_reason = await asyncio.wait_for(read_stdin_line(), args.deadline) or "eof"
    except TimeoutError:
        stop_reason = "deadline"
    for watcher in watchers:
        if watcher.ws is not None and not watcher.closed_by_peer:
            watcher.ws.close()
    await asyncio.sleep(min(CLOSE_GRACE_SECS, 0.2 + len(watchers) / 20_000))
    return {"opened": opened, "failed": len(watchers) - opened, "errors": errors,
            "connect_secs": connect_secs, "stop_reason": stop_reason}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ids", type=Path, required=True, help="file: one order id a line")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=300.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    http11.require_loopback("127.0.0.1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    order_ids = [line.strip() for line in args.ids.read_text().splitlines() if line.strip()]

    async def go() -> dict[str, Any]:
        watchers = [Watcher(order_id) for order_id in order_ids]
        summary = await run(args, watchers)
        received = []
        for watcher in watchers:
            for arrival, text in watcher.messages:
                data = json.loads(text)
                if "seq" in data:
                    received.append([data["order_id"], data["seq"], data["status"], arrival])
        summary["received"] = received
        return summary

    summary = asyncio.run(go())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary["cpu_secs"] = usage.ru_utime + usage.ru_stime
    args.out.write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
