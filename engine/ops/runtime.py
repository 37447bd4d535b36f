"""How the web and worker processes run: on uvloop, with a collector tuned for
many long-lived objects.

Both were measured with ``make bench`` (docs/benchmarks.md): uvloop (with hiredis,
which redis-py picks up by itself) took 17-22% off the CPU per order, and CPython's
default collector thresholds made a full collection, which walks every open
WebSocket's objects (~28 ms per 1,000 sockets), run every few seconds under load.
"""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

# A young collection every 50,000 net allocations instead of 700: short-lived objects
# (a request, an order in flight) die by reference counting before one runs, so few
# are promoted, and the old generation, which holds the sockets, grows and is
# collected far less often. Full collections still run, so cyclic garbage is freed.
GC_THRESHOLDS = (50_000, 20, 10)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop."""
    return uvloop.run(main)


def settle_heap() -> None:
    """Call once the process is set up: what start-up built (modules, schemas, the
    app) is moved out of the collector's view for good, and the thresholds above
    apply from here on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_before_fork() -> None:
    """In a pre-fork parent, just before forking: its objects go to the permanent
    generation (CPython's advice for gc.freeze), so no child's collection writes to,
    and so copies, the pages it inherited."""
    gc.freeze()
