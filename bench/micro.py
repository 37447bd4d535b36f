"""Microbenchmarks of the pure-Python steps of one POST, to size the suggestions.

Run as ``python -m bench.micro --out FILE`` (``bench.run`` does, with orjson on the
path when it could install it into ``bench/out/variants``). Each figure is the median
of several ``timeit`` repeats, in microseconds per call. They are the service's own
functions (``engine.core.strict_json``, ``engine.web.schemas``, ``engine.core.store``), called the
way the POST handler calls them, plus the cost of one access-log line at INFO
versus one dropped at WARNING.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.core import strict_json
from engine.core.store import event_body
from engine.web.schemas import Schemas

BODY = b'{"token_in":"SOL","token_out":"USDC","amount":1.5,"order_type":"market","max_slippage":0.05}'


def per_call_us(fn: Callable[[], Any], number: int = 20_000, repeat: int = 5) -> float:
    times = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(times) / number * 1e6


def measure() -> dict[str, float]:
    schemas = Schemas()
    order = strict_json.loads(BODY)
    plain = json.loads(BODY)  # floats: what json and orjson can write
    order_id = str(uuid.uuid4())
    figures = {
        "strict_json.loads(body)": per_call_us(lambda: strict_json.loads(BODY)),
        "json.loads(body)": per_call_us(lambda: json.loads(BODY)),
        "schemas.errors(order_request) valid": per_call_us(
            lambda: schemas.errors("order_request", order)),
        "str(uuid.uuid4())": per_call_us(lambda: str(uuid.uuid4())),
        # The stored request: exact numbers (Decimal), sorted keys (the create's).
        "strict_json.canonical(request)": per_call_us(lambda: strict_json.canonical(order)),
        "json.dumps(request as floats, sort_keys)": per_call_us(
            lambda: json.dumps(plain, separators=(",", ":"), sort_keys=True)),
        "store.event_body(pending)": per_call_us(
            lambda: event_body(order_id, "pending", 1.7e9, {})),
        "json.dumps(202 body)": per_call_us(
            lambda: json.dumps({"order_id": order_id, "status": "pending"}, separators=(",", ":"))),
    }
    try:
        import orjson  # noqa: PLC0415 - optional, only for the comparison

        figures["orjson.loads(body)"] = per_call_us(lambda: orjson.loads(BODY))
        figures["orjson.dumps(request, sorted)"] = per_call_us(
            lambda: orjson.dumps(plain, option=orjson.OPT_SORT_KEYS))
        figures["orjson.dumps(202 body)"] = per_call_us(
            lambda: orjson.dumps({"order_id": order_id, "status": "pending"}))
    except ImportError:
        pass

    # Tornado's access log: one INFO record per request through a text handler, as
    # engine.ops.logs sets it up, versus the same call filtered out at WARNING.
    access = logging.getLogger("tornado.access")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s web %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]

    def log_line() -> None:
        access.info("%d %s %.2fms", 202, "POST /api/orders/execute (127.0.0.1)", 0.8)
        if stream.tell() > 1_000_000:
            stream.seek(0)
            stream.truncate()

    root.setLevel("INFO")
    figures["access log line at INFO"] = per_call_us(log_line, number=5_000)
    root.setLevel("WARNING")
    figures["access log call at WARNING (dropped)"] = per_call_us(log_line)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(measure(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
