"""Fault-injection harness: the real processes, the faults, and the audit afterwards.

* ``cluster``: a redis-server (AOF, ``appendfsync always``), web processes
  (``server.py`` with ``REDIS_URL``) and workers (``worker.py``) started as children,
  each logging to a file, every one killed when the test ends, however it ends.
* ``clients``: HTTP load and WebSocket watchers that talk to those processes over
  loopback, plus a raw WebSocket for frames no well-behaved client would send.
* ``audit``: reads Redis after the fact: was any accepted order lost, did any status
  repeat, did any order execute twice (the venues' ledger), is anything still pending.
* ``report``: the figures each test measured, collected into one JSON file.

``SOAK=1`` in the environment scales every test up (see ``scaled``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

SOAK = os.environ.get("SOAK", "").strip() not in ("", "0")


def scaled(default: int, soak: int) -> int:
    """``default`` in the normal run (CI), ``soak`` with SOAK=1."""
    return soak if SOAK else default


def run_scenario(scenario: Coroutine[Any, Any, None], timeout: float) -> None:
    """Run a test's coroutine on an event loop of its own, with a deadline.

    Not ``asyncio.run()``: that leaves the thread with no current event loop when it
    ends, dropping the one pytest-tornasync's first ``io_loop`` left current (Tornado
    keeps it as ``old_asyncio`` and never closes it); collected later, it warns, an
    error under this suite's ``filterwarnings = error``, in whichever test runs then.
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario, timeout))
    finally:
        try:
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(_settle(leftovers))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


async def _settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
