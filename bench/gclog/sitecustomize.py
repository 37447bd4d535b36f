"""Logs the web process's garbage-collection pauses, for the bench (no service change).

``bench.run`` puts this directory on the web process's PYTHONPATH with
``BENCH_GC_LOG=<file>``; Python imports ``sitecustomize`` at start-up, and this one
adds a ``gc.callbacks`` hook that appends one line per collection of 1 ms or more:
``<time.monotonic()> <generation> <pause ms> <objects collected>``. The bench then
reads the pauses that fell inside each phase. The hook itself costs about a
microsecond per collection. Without BENCH_GC_LOG it does nothing.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

_PATH = os.environ.get("BENCH_GC_LOG")
_MIN_PAUSE_SECS = 0.001

if _PATH:
    _log = open(_PATH, "a", buffering=1)  # noqa: SIM115 - open for the process's lifetime
    _started = [0.0]

    def _on_gc(phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            _started[0] = now
            return
        pause = now - _started[0]
        if pause >= _MIN_PAUSE_SECS:
            _log.write(f"{now:.6f} {info['generation']} {pause * 1000:.3f} {info['collected']}\n")

    gc.callbacks.append(_on_gc)
