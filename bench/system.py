"""The system under test: start and stop Redis, web, worker, floor and load processes.

Every child the bench starts is registered here and stopped by ``stop_all()``
(SIGTERM, then SIGKILL after a grace period), which ``bench.run`` calls in a
``finally``, so an error or a Ctrl-C leaves nothing running. Children run in their
own session (a Ctrl-C reaches only the bench, which then stops them in order) and
get SIGTERM if the bench itself dies (``die_with_parent``).

Also here: reading a process's CPU time, RSS and open files from ``/proc``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from engine.core.config import PROJECT_ROOT
from engine.ops.api_keys import store_key
from engine.ops.redis_server import RedisServer, die_with_parent, free_port, stop_process

GC_LOG_DIR = PROJECT_ROOT / "bench" / "gclog"
READY_TIMEOUT_SECS = 20.0
STOP_GRACE_SECS = 15.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Zero-latency, never-failing venues: the bench measures our code, not the simulation.
SERVICE_ENV = {
    "HOST": "127.0.0.1",
    "WEB_CONCURRENCY": "1",
    "LOG_LEVEL": "WARNING",
    "QUOTE_LATENCY_MS": "0",
    "CONFIRM_LATENCY_MIN_MS": "0",
    "CONFIRM_LATENCY_MAX_MS": "0",
    "VENUE_FAILURE_RATE": "0",
    # The submit phases run with no worker, so every accepted order waits: past the
    # default MAX_QUEUE_LAG (10,000) the service would rightly answer 503 overloaded.
    # A limit that is never reached keeps its check (one XLEN) in every create.
    "MAX_QUEUE_LAG": str(10**9),
    "PYTHONUNBUFFERED": "1",
}
# Variables of the service that must not leak in from the caller's shell.
_SCRUBBED = ("REDIS_URL", "SERVER_PORT", "PORT", "DATA_DIR", "PYTHONPATH", "AUTH", "MAX_QUEUE_LAG",
             "RATE_LIMIT_PER_SEC", "RATE_LIMIT_BURST")


# Every order the bench places carries this API key (keys are on, as users run the
# service), stored in each of the bench's Redis servers with a rate limit it never
# reaches: the key's check and its GCRA step run on every POST all the same.
BENCH_API_KEY = "oek_be4c000000000001_" + "B" * 43
BENCH_AUTH_HEADER = f"Authorization: Bearer {BENCH_API_KEY}"


def add_bench_key(url: str) -> None:
    """Store BENCH_API_KEY in the Redis at ``url`` (again after a flush)."""
    store_key(url, "bench", BENCH_API_KEY, rate=1e6, burst=10**6)


def raise_fd_limit() -> int:
    """Raise this process's open-files limit to its hard limit; the new limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def child_setup() -> None:
    """preexec_fn of every child: many sockets allowed, and die with the bench."""
    raise_fd_limit()
    die_with_parent()


def cpu_secs(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" closing the command name: fields[11] is utime, fields[12] stime.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (e.g. a pre-fork supervisor's web processes)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(children)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclasses.dataclass
class Child:
    """One process the bench started."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclasses.dataclass
class Service:
    """A web-like process (the service or the floor) listening on ``port``."""

    child: Child
    port: int
    gc_log: Path | None = None

    @property
    def pid(self) -> int:
        return self.child.pid

    def gc_pauses(self, start: float, end: float) -> dict[str, float]:
        """GC pauses of 1 ms or more between two ``time.monotonic()`` readings."""
        if self.gc_log is None or not self.gc_log.exists():
            return {}
        pauses = []
        for line in self.gc_log.read_text().splitlines():
            at, generation, ms, _collected = line.split()
            if start <= float(at) <= end:
                pauses.append((int(generation), float(ms)))
        return {
            "count": len(pauses),
            "gen2_count": sum(1 for g, _ in pauses if g == 2),
            "max_ms": max((ms for _, ms in pauses), default=0.0),
            "max_gen2_ms": max((ms for g, ms in pauses if g == 2), default=0.0),
            "total_ms": sum(ms for _, ms in pauses),
        }


class System:
    """Owns every process of one bench run."""

    def __init__(self, out_dir: Path, appendfsync: str) -> None:
        self.out_dir = out_dir
        self.log_dir = out_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*"):  # one run's logs only
            if old.is_file():
                old.unlink()
        self.appendfsync = appendfsync
        self.redis_servers: list[RedisServer] = []
        self.children: list[Child] = []
        self.redis_url = ""

    # -- processes ---------------------------------------------------------------

    def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
        *, stdin: int | IO[bytes] | None = subprocess.DEVNULL, stdout: int | None = None,
    ) -> Child:
        """Start ``argv`` in the project root; stderr (and stdout unless piped) to a log."""
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(
                list(argv), cwd=PROJECT_ROOT, env=dict(env or self.base_env()),
                stdin=stdin, stdout=log_file if stdout is None else stdout, stderr=log_file,
                start_new_session=True, preexec_fn=child_setup,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace_secs: float = STOP_GRACE_SECS) -> int | None:
        """SIGTERM, wait, SIGKILL; the exit code."""
        stop_process(child.proc, grace_secs)
        if child in self.children:
            self.children.remove(child)
        return child.proc.returncode

    def stop_all(self) -> None:
        """Stop every child (newest first), then Redis. Safe to call twice."""
        for child in reversed(list(self.children)):
            self.stop(child, grace_secs=5.0)
        for server in self.redis_servers:
            server.stop()
        self.redis_servers.clear()

    # -- the system's parts -------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        env.update(SERVICE_ENV)
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env

    def start_redis(self, appendfsync: str | None = None, name: str = "redis") -> RedisServer:
        """A fresh redis-server (AOF, ``appendfsync``) with its data under out/."""
        data_dir = self.out_dir / "data" / name
        for old in data_dir.glob("*") if data_dir.exists() else ():
            if old.is_file():
                old.unlink()
            elif old.is_dir():
                for f in old.glob("*"):
                    f.unlink()
                old.rmdir()
        server = RedisServer(data_dir, appendfsync=appendfsync or self.appendfsync)
        self.redis_servers.append(server)
        url = server.start()
        add_bench_key(url)
        if not self.redis_url:
            self.redis_url = url
        return server

    def start_web(
        self, name: str = "web", extra_env: Mapping[str, str] | None = None,
        redis_url: str | None = None, gc_log: bool = False, tree: Path = PROJECT_ROOT,
    ) -> Service:
        """``server.py`` on a free loopback port; returns once /readyz answers 200.
        With ``gc_log``, its GC pauses go to ``Service.gc_log`` (see bench/gclog).
        ``tree`` is the source tree whose ``server.py`` (and so whose packages) run."""
        port = free_port()
        env = self.base_env()
        env["SERVER_PORT"] = str(port)
        gc_path = None
        if gc_log:
            gc_path = self.log_dir / f"{name}-{port}.gc"
            env["PYTHONPATH"] = str(GC_LOG_DIR)
            env["BENCH_GC_LOG"] = str(gc_path)
        if redis_url:
            env["REDIS_URL"] = redis_url
        env.update(extra_env or {})
        child = self.spawn(name, [sys.executable, str(tree / "server.py")], env)
        wait_ready(port, child)
        return Service(child, port, gc_path)

    def start_floor(self, pipelined: bool = False) -> Service:
        """The floor (bench/floor_server.py); ``pipelined``: its XADD over engine.core.pipelined."""
        port = free_port()
        child = self.spawn(
            "floor-pipelined" if pipelined else "floor",
            [sys.executable, "-m", "bench.floor_server", "--port", str(port),
             "--redis-url", self.redis_url, "--log-level", SERVICE_ENV["LOG_LEVEL"],
             *(["--pipelined"] if pipelined else [])],
        )
        wait_ready(port, child)
        return Service(child, port)

    def start_worker(self, extra_env: Mapping[str, str] | None = None) -> Child:
        env = self.base_env()
        env.update(extra_env or {})
        return self.spawn("worker", [sys.executable, str(PROJECT_ROOT / "worker.py")], env)


def wait_ready(port: int, child: Child) -> None:
    """Poll GET /readyz until 200; raise if the process exits or the deadline passes."""
    url = f"http://127.0.0.1:{port}/readyz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    while True:
        if child.proc.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited with code {child.proc.returncode}; see {child.log}"
            )
        try:
            with opener.open(url, timeout=1.0) as response:
                if response.status == 200:
                    json.loads(response.read() or b"{}")
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready within {READY_TIMEOUT_SECS:.0f} s")
        time.sleep(0.05)


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def foreign_cpu_snapshot() -> dict[int, float]:
    """CPU seconds so far of every process that is not the bench or below it: the
    machine is shared, and this is how much of it others used during a run."""
    ours = _descendants(os.getpid())
    snapshot = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in ours:
            try:
                snapshot[int(entry)] = cpu_secs(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return snapshot


def foreign_core_pct(before: Mapping[int, float], after: Mapping[int, float], wall: float) -> float:
    """Share of one core (%) that other processes used between two snapshots."""
    used = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
    return 100 * used / wall if wall > 0 else float("nan")
