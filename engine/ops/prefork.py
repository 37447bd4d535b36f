"""Run N copies of the web process on one listening socket (WEB_CONCURRENCY).

The parent binds the socket, forks the children, forwards SIGTERM/SIGINT to them and
waits for them to finish; a child that dies unexpectedly is replaced. Tornado's own
``fork_processes`` neither forwards signals nor waits for a graceful exit, and it
reaps every child, including the embedded Redis and the worker, so it is not used.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

from engine.ops.logs import stop_logging

logger = logging.getLogger(__name__)

# A child that keeps dying this soon after its start is not restarted again.
FAST_DEATH_SECS = 2.0
MAX_FAST_DEATHS = 5
# How often the parent looks for children that ended (waitpid on each of its own).
POLL_SECS = 0.2


def supervise(count: int, run_child: Callable[[int], int]) -> int:
    """Fork ``count`` children running ``run_child(slot)``; return when all have ended.

    The result is 0 when the children were stopped by a signal and ended cleanly,
    1 when they kept failing.
    """
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
    stopping = False
    fast_deaths = 0

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = run_child(slot)
            except BaseException:  # the child's outermost frame: report, then exit
                logger.exception("web process %s failed", slot)
            finally:
                stop_logging()  # write what is queued: os._exit skips atexit
                logging.shutdown()
                os._exit(code)
        children[pid] = (slot, time.monotonic())

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        for slot in range(count):
            spawn(slot)
        logger.info("started %s web processes: %s", count, sorted(children))
        while children:
            time.sleep(POLL_SECS)
            for pid, (slot, started) in list(children.items()):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if done == 0:
                    continue
                del children[pid]
                code = os.waitstatus_to_exitcode(status)
                if stopping:
                    failed = failed or code not in (0, -signal.SIGTERM, -signal.SIGINT)
                    continue
                logger.error("web process %s (pid %s) ended with %s; starting another",
                             slot, pid, code)
                if time.monotonic() - started < FAST_DEATH_SECS:
                    fast_deaths += 1
                    if fast_deaths >= MAX_FAST_DEATHS:
                        logger.error("web processes keep failing at start; giving up")
                        forward(signal.SIGTERM, None)
                        failed = True
                        continue
                spawn(slot)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0
