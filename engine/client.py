"""A small command-line client: submit an order and watch it to the end.

    python -m engine.client SOL USDC 1.5 --slippage 0.01 [--url http://localhost:3000]

Shows each status as it arrives (a progress bar on a terminal, one line per status
otherwise), then the tx hash and price. Exit code: 0 confirmed, 1 failed, 2 the order
was refused (the server's reasons are printed), 3 the service could not be reached
or could not say whether it took the order.

Amounts go out and come back exactly as written (no binary floats), and every order
is sent with an Idempotency-Key (a new one unless ``--idempotency-key`` gives it):
after an answer that leaves the order's fate unknown, the client prints the command
that retries it safely.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shlex
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from engine.core import strict_json
from engine.core.config import Config
from engine.core.status import HAPPY_PATH, OrderStatus
from engine.ops.api_keys import dev_key_path

STEPS = tuple(HAPPY_PATH)
EXIT_CONFIRMED, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3
BAR_WIDTH = len(STEPS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.client", description="Swap tokens and watch the order live."
    )
    parser.add_argument("token_in", help="token to sell, e.g. SOL")
    parser.add_argument("token_out", help="token to buy, e.g. USDC")
    parser.add_argument("amount", help="amount of token_in to sell")
    parser.add_argument(
        "--slippage", default="0.01", help="max price move as a fraction (default 0.01 = 1%%)"
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("ORDER_API_URL", "http://localhost:3000"),
        help="the service (default $ORDER_API_URL or http://localhost:3000)",
    )
    parser.add_argument("--idempotency-key", help="resubmit safely with the same key")
    parser.add_argument(
        "--api-key",
        help="the API key (default $ORDER_API_KEY, else, for a service on this machine, the "
        "development key that `make run` writes to $DATA_DIR/dev-api-key)",
    )
    return parser.parse_args(argv)


def api_key(
    given: str | None, url: str = "http://localhost", environ: Mapping[str, str] = os.environ
) -> str | None:
    """The API key to send to ``url``: ``--api-key``, else ORDER_API_KEY, else, for a
    service on this machine only, the embedded mode's development key file
    (engine.ops.api_keys.DEV_KEY_FILE under DATA_DIR); None if there is none. The dev
    key never goes to another host: it would leak there, and count as a failed
    authentication of this address."""
    if given:
        return given
    if environ.get("ORDER_API_KEY"):
        return environ["ORDER_API_KEY"].strip()
    if not _is_loopback(url):
        return None
    data_dir = Path(environ["DATA_DIR"]) if environ.get("DATA_DIR") else Config().data_dir
    try:
        return dev_key_path(data_dir).read_text().strip() or None
    except OSError:
        return None


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(text: str) -> Any:
    """Send numbers as numbers, exactly as typed (``0.1`` stays one tenth), anything
    else as typed: the server explains what is wrong."""
    try:
        return strict_json.loads(text)
    except strict_json.InvalidJSON:
        return text


class Progress:
    """Renders statuses: a redrawn bar on a terminal, plain lines elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()

    def show(self, message: dict[str, Any]) -> None:
        status = message.get("status", "?")
        step = STEPS.index(status) + 1 if status in STEPS else BAR_WIDTH
        bar = "#" * step + "-" * (BAR_WIDTH - step)
        detail = ""
        if "venue" in message and status in (OrderStatus.BUILDING, OrderStatus.SUBMITTED):
            detail = f" via {message['venue']}"
        if "tx_hash" in message:
            detail += f" tx {message['tx_hash'][:10]}..."
        if self.tty:
            self.out.write(f"\r\x1b[2K[{bar}] {status}{detail}")
        else:
            self.out.write(f"[{bar}] {status}{detail}\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


async def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    base = args.url.rstrip("/")
    order = {
        "token_in": args.token_in,
        "token_out": args.token_out,
        "amount": _number(args.amount),
        "order_type": "market",
        "max_slippage": _number(args.slippage),
    }
    key = args.idempotency_key or str(uuid.uuid4())
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    bearer = api_key(args.api_key, base)
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    http = AsyncHTTPClient()
    try:
        response = await http.fetch(
            f"{base}/api/orders/execute", method="POST", body=strict_json.dumps(order), headers=headers
        )
    except HTTPClientError as exc:
        body = json.loads(exc.response.body) if exc.response and exc.response.body else {}
        err.write(f"order refused ({exc.code}): {body.get('message', exc.message)}\n")
        for detail in body.get("details", []):
            err.write(f"  {detail['field'] or 'body'}: {detail['message']}\n")
        if exc.code == 401:
            err.write("pass an API key with --api-key or ORDER_API_KEY (create one with "
                      "`make api-key NAME=...`); `make run` writes a development key to "
                      "data/dev-api-key\n")
        if exc.code in (503, 504):
            # 503: nothing was created; 504: perhaps it was. The same key is safe either way.
            again = [args.token_in, args.token_out, args.amount, "--slippage", args.slippage,
                     "--url", args.url, "--idempotency-key", key]
            err.write(f"retry safely with: python -m engine.client {shlex.join(again)}\n")
        return EXIT_UNREACHABLE if exc.code >= 500 or exc.code == 599 else EXIT_REFUSED
    except OSError as exc:
        err.write(f"cannot reach {base}: {exc}\n")
        return EXIT_UNREACHABLE
    order_id = json.loads(response.body)["order_id"]
    out.write(f"order {order_id}\n")

    ws_url = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    progress = Progress(out)
    last: dict[str, Any] = {}
    try:
        ws = await websocket_connect(HTTPRequest(f"{ws_url}/api/orders/status"))
        await ws.write_message(order_id)
        while (raw := await ws.read_message()) is not None:
            last = strict_json.loads(raw)  # amounts exactly as the service wrote them
            if "error" in last:
                break
            progress.show(last)
        ws.close()
    except OSError as exc:
        progress.done()
        err.write(f"lost the status stream: {exc}; see GET {base}/api/orders/{order_id}\n")
        return EXIT_UNREACHABLE
    progress.done()
    if last.get("status") == OrderStatus.CONFIRMED:
        out.write(
            f"confirmed: {order['amount']} {args.token_in} -> {last.get('amount_out')} "
            f"{args.token_out} at {last['execution_price']} on {last.get('venue')}\n"
            f"tx {last['tx_hash']}\n"
        )
        return EXIT_CONFIRMED
    if last.get("status") == OrderStatus.FAILED:
        err.write(f"failed: {last.get('reason')}\n")
        return EXIT_FAILED
    err.write(f"the status stream ended early: {last.get('message', last)}\n")
    return EXIT_UNREACHABLE


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
