"""Where the web process spends its CPU under submit load: py-spy, summarised.

``py-spy record --format speedscope`` samples the running web process (no change
to it, no restart); the file opens in https://www.speedscope.app. This module also
reads it back and sums the samples per function (self and inclusive) and per
component (Tornado, redis-py, asyncio, json, logging, our own code...), which is what
the report shows. Idle samples (the loop waiting in epoll) are left out by py-spy, so
the shares are shares of CPU time actually used.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Components, matched in order against a frame's file path.
_COMPONENTS = (
    ("tornado/web.py", "tornado RequestHandler"),
    ("tornado/http1connection.py", "tornado HTTP/1 parsing+writing"),
    ("tornado/httputil.py", "tornado HTTP/1 parsing+writing"),
    ("tornado/iostream.py", "tornado IOStream"),
    ("tornado/routing.py", "tornado routing"),
    ("tornado/", "tornado other"),
    ("redis/", "redis-py client"),
    ("hiredis", "redis-py client"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("uvloop", "asyncio event loop"),
    ("json/", "json (stdlib)"),
    ("logging/", "logging"),
    ("uuid.py", "uuid"),
    ("jsonschema_rs", "jsonschema-rs"),
    ("jsonschema", "jsonschema"),
    ("socket.py", "socket module (getaddrinfo...)"),
    ("/engine/", "engine/ (our code)"),
    ("/handlers/", "handlers/ (our code)"),
    ("server.py", "server.py"),
)


def pyspy_binary() -> str | None:
    """py-spy from the bench's venv, else from PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def record_command(binary: str, pid: int, duration_secs: int, out: Path) -> list[str]:
    return [binary, "record", "--pid", str(pid), "--duration", str(duration_secs),
            "--rate", "200", "--format", "speedscope", "--output", str(out)]


def component(file: str) -> str:
    for needle, name in _COMPONENTS:
        if needle in file:
            return name
    return "other (stdlib, C calls)" if "python3" in file else "other"


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def summarize_speedscope(path: Path, top: int = 20) -> dict[str, Any]:
    """Per-function self/inclusive shares and per-component shares of the samples."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    names = [f"{f['name']} ({_short(f.get('file', '?'))})" for f in frames]
    comps = [component(f.get("file", "")) for f in frames]
    total = 0.0
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    comp_self: Counter[str] = Counter()
    comp_incl: Counter[str] = Counter()
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            total += weight
            for name in {names[i] for i in stack}:
                inclusive[name] += weight
            for comp in {comps[i] for i in stack}:
                comp_incl[comp] += weight
            # speedscope stacks run from the root to the leaf.
            self_time[names[stack[-1]]] += weight
            comp_self[comps[stack[-1]]] += weight

    def shares(counter: Counter[str], n: int | None = None) -> list[tuple[str, float]]:
        return [(k, 100 * v / total) for k, v in counter.most_common(n)] if total else []

    ours = Counter({name: count for name, count in inclusive.items()
                    if any(m in name for m in ("(engine/", "(handlers/", "(server.py", "(worker.py"))})
    return {
        "samples": total,
        "ours_inclusive_pct": shares(ours, top),
        "top_self_pct": shares(self_time, top),
        "top_inclusive_pct": shares(inclusive, top + 20),
        "component_self_pct": shares(comp_self),
        "component_inclusive_pct": shares(comp_incl),
    }
