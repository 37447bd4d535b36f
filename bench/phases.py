"""The measurements. Each function runs one phase against processes that are already
up and returns JSON-ready figures; raw latencies for the plot go into ``Samples``.

All load comes from separate processes (``bench.httpgen``, ``bench.e2e_client``,
``bench.fanout_client``); only the fan-out driver, which writes status changes
through ``engine.core.store.OrderStore`` exactly as the worker does, runs in the bench
process itself. Every wait below has a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import math
import selectors
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis as redis_sync
from redis.asyncio import Redis

from bench.stats import spectrum, summarize
from bench.system import (
    BENCH_AUTH_HEADER,
    Child,
    Service,
    System,
    add_bench_key,
    cpu_secs,
    foreign_core_pct,
    foreign_cpu_snapshot,
    open_fds,
    rss_kb,
)
from bench.timer import PreciseSleeper
from engine.core import keys
from engine.core.config import Config
from engine.core.store import OrderStore

# Seconds between starting load processes and their first request: Python starts,
# imports and opens its connections within it.
GENERATOR_LEAD_SECS = 0.6
CLIENT_LEAD_SECS = 1.2
# A generator whose timetable loop runs later than this at p99, or that uses more
# than this share of a core, may have limited the offered load itself.
GENERATOR_LAG_LIMIT_MS = 1.0
GENERATOR_CPU_LIMIT = 0.85
# Status changes the fan-out driver makes, in order, on each subscribed order.
FANOUT_STATUSES = ("routing", "building", "submitted")
FANOUT_SETTLE_SECS = 1.5
SOCKETS_PER_CLIENT_PROCESS = 5_000


@dataclasses.dataclass
class Samples:
    """Raw latencies (ms) by label, for the plot only (results.json keeps summaries)."""

    submit: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    e2e: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    fanout: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def _cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = cpu_secs(pid)
        except OSError:
            out[name] = math.nan
    return out


def _cpu_figures(
    before: Mapping[str, float], after: Mapping[str, float], wall: float, units: int,
) -> dict[str, dict[str, float]]:
    """CPU seconds, share of one core over ``wall``, and microseconds per unit of work."""
    figures = {}
    for name, start in before.items():
        used = after.get(name, math.nan) - start
        figures[name] = {
            "cpu_secs": used,
            "core_pct": 100 * used / wall if wall > 0 else math.nan,
            "us_per_unit": 1e6 * used / units if units else math.nan,
        }
    return figures


def redis_command_calls(url: str) -> dict[str, int]:
    """Calls so far of each Redis command (INFO commandstats); commands that Lua scripts
    run are counted too, besides the EVALSHA that ran them."""
    client = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


class SentCommands:
    """Counts, with MONITOR, the commands Redis's clients send (a script's EVALSHA once)
    apart from those the scripts run, while it is open: a context manager.

    INFO commandstats counts both kinds alike, so it cannot say how many round trips
    an order costs; MONITOR tags every command a script runs with ``lua``. MONITOR
    slows Redis down, so the bench counts over a run of its own, not a timed one."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: Counter[str] = Counter()
        self.in_scripts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="monitor", daemon=True)

    def __enter__(self) -> SentCommands:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        poke = redis_sync.Redis.from_url(self.url)
        try:  # one more command, so the listener wakes up and sees the stop
            poke.ping()
        finally:
            poke.close()
        self._thread.join(10)

    def _listen(self) -> None:
        client = redis_sync.Redis.from_url(self.url, decode_responses=True)
        try:
            with client.monitor() as monitor:
                self._ready.set()
                for command in monitor.listen():
                    if self._stop.is_set():
                        return
                    name = command["command"].split(" ", 1)[0].upper()
                    counter = self.in_scripts if command.get("client_type") == "lua" else self.sent
                    counter[name] += 1
        finally:
            client.close()

    def per_unit(self, units: int) -> dict[str, dict[str, float]]:
        """{"sent": {command: per unit}, "in_scripts": {...}}, largest first."""
        return {"sent": commands_per_unit({}, self.sent, units),
                "in_scripts": commands_per_unit({}, self.in_scripts, units)}


def redis_forks(url: str) -> int:
    """Forks the bench's Redis has made (INFO stats ``total_forks``). Its RDB saves are
    off, so each is an AOF rewrite: a child rewriting the whole file, which on this
    machine competes for the two cores and the disk, and can stall Redis's own writes."""
    client = redis_sync.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_forks"])
    finally:
        client.close()


def commands_per_unit(before: Mapping[str, int], after: Mapping[str, int], units: int) -> dict[str, float]:
    """Redis commands per unit of work (request, order, event), largest first."""
    if not units:
        return {}
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: round(v / units, 3) for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v > 0}


def stop_fanout_clients(children: list[Child]) -> None:
    """Tell each ``bench.fanout_client`` to close its sockets, write its results and exit."""
    for child in children:
        assert child.proc.stdin is not None
        child.proc.stdin.write(b"STOP\n")
        child.proc.stdin.flush()


def _wait_all(children: list[Child], timeout: float, system: System) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in children:
                system.stop(other, grace_secs=1.0)
            raise RuntimeError(f"{child.name} did not finish within {timeout:.0f} s") from None
        system.stop(child)
        if child.proc.returncode != 0:
            raise RuntimeError(f"{child.name} failed (code {child.proc.returncode}); see {child.log}")


# -- 1. submit: open-loop POSTs --------------------------------------------------------


def submit_run(
    system: System, target: Service, label: str, rate: float, duration: float, *,
    procs: int, connections: int, watch: Mapping[str, int], tmp: Path, samples: Samples,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """One open-loop run: ``rate`` POST/s for ``duration`` s from ``procs`` processes.
    With ``redis_url``, Redis commands per request are counted too."""
    start_at = time.monotonic() + GENERATOR_LEAD_SECS
    outs = [tmp / f"gen-{uuid.uuid4().hex[:8]}-{i}.json" for i in range(procs)]
    calls_before = redis_command_calls(redis_url) if redis_url else {}
    forks_before = redis_forks(system.redis_url)
    cpu_before = _cpu_snapshot(watch)
    foreign_before, wall_start = foreign_cpu_snapshot(), time.monotonic()
    children = [
        system.spawn(
            f"httpgen-{i}",
            [sys.executable, "-m", "bench.httpgen", "--port", str(target.port),
             "--rate", str(rate), "--duration", str(duration), "--connections", str(connections),
             "--index", str(i), "--procs", str(procs), "--start-at", repr(start_at),
             "--header", BENCH_AUTH_HEADER, "--out", str(outs[i])],
        )
        for i in range(procs)
    ]
    _wait_all(children, duration + GENERATOR_LEAD_SECS + 30, system)
    cpu_after = _cpu_snapshot(watch)
    foreign = foreign_core_pct(foreign_before, foreign_cpu_snapshot(), time.monotonic() - wall_start)
    calls_after = redis_command_calls(redis_url) if redis_url else {}
    aof_rewrites = redis_forks(system.redis_url) - forks_before
    parts = [json.loads(out.read_text()) for out in outs]
    for out in outs:
        out.unlink()

    latencies = [x for p in parts for x in p["latencies_ms"]]
    statuses: Counter[str] = Counter()
    for p in parts:
        statuses.update(p["status_counts"])
    scheduled = sum(p["count"] for p in parts)
    answered = len(latencies)
    first_due = min(p["first_due"] for p in parts)
    last_done = max(p["last_done"] for p in parts)
    window = max(1e-9, last_done - first_due)
    dispatch = summarize(x for p in parts for x in p["dispatch_lag_ms"])
    gen_core = max(p["cpu_secs"] / max(duration, 1e-9) for p in parts)
    samples.submit.setdefault(f"{label}@{rate:g}", []).extend(latencies)
    return {
        "target": label,
        "rate": rate,
        "duration_secs": duration,
        "generator_procs": procs,
        "connections_per_proc": connections,
        "scheduled": scheduled,
        "answered": answered,
        "status_counts": dict(statuses),
        "ok": statuses.get("202", 0),
        "achieved_rate": answered / window,
        "latency_ms": summarize(latencies),
        "spectrum_ms": spectrum(latencies),
        "send_lag_ms": summarize(x for p in parts for x in p["send_lag_ms"]),
        "dispatch_lag_ms": dispatch,
        "generator_core_share": gen_core,
        "generator_limited": dispatch["p99"] > GENERATOR_LAG_LIMIT_MS or gen_core > GENERATOR_CPU_LIMIT,
        "cpu": _cpu_figures(cpu_before, cpu_after, window, answered),
        "redis_commands_per_request": commands_per_unit(calls_before, calls_after, answered),
        "web_gc": target.gc_pauses(first_due, last_done),
        "foreign_core_pct": foreign,
        "aof_rewrites": aof_rewrites,
    }


# -- 2. end to end ----------------------------------------------------------------------


def flush_redis(url: str) -> None:
    """Empty the bench's own Redis between phases (never any other Redis)."""
    client = redis_sync.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()
    add_bench_key(url)


def drop_queued_orders(url: str) -> int:
    """Empty the orders stream (the fan-out phase's synthetic orders, which no worker
    has read), so a worker started afterwards executes only new orders."""
    client = redis_sync.Redis.from_url(url)
    try:
        return int(client.xtrim(keys.ORDERS_STREAM, maxlen=0))
    finally:
        client.close()


def wait_worker_ready(url: str, worker: Child, timeout: float = 20.0) -> None:
    """Until the worker's consumer group exists (it creates it when it starts)."""
    client = redis_sync.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker exited with code {worker.proc.returncode}; see {worker.log}")
            try:
                groups = client.xinfo_groups(keys.ORDERS_STREAM)
                if any(g["name"] == keys.EXECUTORS_GROUP for g in groups):
                    return
            except redis_sync.ResponseError:
                pass  # no stream yet
            time.sleep(0.05)
    finally:
        client.close()
    raise RuntimeError(f"worker not consuming within {timeout:.0f} s")


def e2e_run(
    system: System, target: Service, label: str, orders: int, *, procs: int, concurrency: int,
    watch: Mapping[str, int], tmp: Path, samples: Samples | None, deadline_secs: float,
) -> dict[str, Any]:
    """``orders`` orders, each POSTed then watched on a WebSocket to its terminal status."""
    start_at = time.monotonic() + CLIENT_LEAD_SECS
    outs = [tmp / f"e2e-{uuid.uuid4().hex[:8]}-{i}.json" for i in range(procs)]
    per_proc = [orders // procs + (1 if i < orders % procs else 0) for i in range(procs)]
    calls_before = redis_command_calls(system.redis_url)
    cpu_before = _cpu_snapshot(watch)
    foreign_before, wall_start = foreign_cpu_snapshot(), time.monotonic()
    children = [
        system.spawn(
            f"e2e-{i}",
            [sys.executable, "-m", "bench.e2e_client", "--port", str(target.port),
             "--orders", str(per_proc[i]), "--concurrency", str(concurrency),
             "--start-at", repr(start_at), "--deadline", str(deadline_secs), "--seed", str(i + 1),
             "--out", str(outs[i])],
        )
        for i in range(procs)
    ]
    _wait_all(children, deadline_secs + 30, system)
    cpu_after = _cpu_snapshot(watch)
    foreign = foreign_core_pct(foreign_before, foreign_cpu_snapshot(), time.monotonic() - wall_start)
    calls_after = redis_command_calls(system.redis_url)
    parts = [json.loads(out.read_text()) for out in outs]
    for out in outs:
        out.unlink()
    records = [r for p in parts for r in p["records"]]
    finished = [r for r in records if r.get("terminal") is not None]
    accepted = [r for r in records if r.get("accepted") is not None]
    first_start = min((r["start"] for r in records), default=0.0)
    last_terminal = max((r["terminal"] for r in finished), default=first_start)
    window = max(1e-9, last_terminal - first_start)
    post_ms = [(r["accepted"] - r["start"]) * 1000 for r in accepted]
    e2e_ms = [(r["terminal"] - r["start"]) * 1000 for r in finished]
    first_ms = [(r["first_message"] - r["start"]) * 1000 for r in accepted if r.get("first_message")]
    if samples is not None:
        samples.e2e[f"{label} ({procs * concurrency} in flight) POST->terminal"] = e2e_ms
    clients_cpu = sum(p["cpu_secs"] for p in parts)
    return {
        "label": label,
        "orders": orders,
        "client_procs": procs,
        "concurrency_per_proc": concurrency,
        "in_flight_max": procs * concurrency,
        "finished": len(finished),
        "final_status": dict(Counter(r.get("final_status") or "none" for r in records)),
        "errors": dict(Counter(r["error"] for r in records if r.get("error"))),
        "sequence_violations": sum(1 for r in records if r.get("sequence_ok") is False),
        "close_codes": dict(Counter(str(r.get("close_code")) for r in finished)),
        "deadline_hit": any(p["deadline_hit"] for p in parts),
        "window_secs": window,
        "orders_per_sec": len(finished) / window,
        "post_ms": summarize(post_ms),
        "post_to_first_status_ms": summarize(first_ms),
        "post_to_terminal_ms": summarize(e2e_ms),
        "cpu": _cpu_figures(cpu_before, cpu_after, window, len(finished)),
        "redis_commands_per_order": commands_per_unit(calls_before, calls_after, len(finished)),
        "web_gc": target.gc_pauses(first_start, last_terminal),
        "foreign_core_pct": foreign,
        "clients_core_share": clients_cpu / window / procs,
    }


# -- 3 and 4. fan-out delay and WebSocket capacity --------------------------------------


def create_orders(redis_url: str, count: int) -> list[str]:
    """``count`` new pending orders, written as the POST handler writes them; their ids."""
    redis = Redis.from_url(redis_url, decode_responses=True, max_connections=1000)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_create_orders(OrderStore(redis, _driver_config(redis_url)), count))
    finally:
        loop.run_until_complete(redis.aclose())
        loop.close()


def _driver_config(redis_url: str) -> Config:
    """The configuration of the bench's own OrderStore: like the services' (see
    SERVICE_ENV), no backpressure limit, as the orders it creates are never executed."""
    return Config(redis_url=redis_url, max_queue_lag=0)


async def _create_orders(store: OrderStore, count: int) -> list[str]:
    """``count`` new pending orders; raises if any was not created."""
    order = {"token_in": "SOL", "token_out": "USDC", "amount": 1.0, "order_type": "market",
             "max_slippage": 0.05}
    ids = [str(uuid.uuid4()) for _ in range(count)]
    batch = 200
    for i in range(0, count, batch):
        results = await asyncio.gather(*(store.create(oid, order) for oid in ids[i : i + batch]))
        refused = [r.outcome for r in results if r.outcome != "created"]
        if refused:
            raise RuntimeError(f"the bench's orders were refused: {Counter(refused)}")
    return ids


async def _drive_events(
    store: OrderStore, plan: list[tuple[str, str]], rate: float,
) -> list[dict[str, Any]]:
    """Write ``plan``'s (order id, status) changes open loop at ``rate`` per second."""
    writes: list[dict[str, Any]] = []
    tasks: set[asyncio.Task[None]] = set()
    sleeper = PreciseSleeper()
    # The driver's own GC pauses would delay writes (see driver_lag); keep it off here.
    gc.disable()
    start = time.monotonic() + 0.05

    async def write(order_id: str, status: str, due: float) -> None:
        began = time.monotonic()
        result = await store.transition(order_id, status, venue="raydium", quoted_price=220.41)
        writes.append({"order_id": order_id, "status": status, "due": due, "began": began,
                       "acked": time.monotonic(), "applied": result.applied})

    for k, (order_id, status) in enumerate(plan):
        due = start + k / rate
        await sleeper.until(due)
        task = asyncio.create_task(write(order_id, status, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sleeper.close()
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    gc.enable()
    return writes


def read_ready_lines(children: list[Child], timeout: float) -> list[tuple[int, int]]:
    """Wait for each fan-out client's ``READY open failed`` line."""
    selector = selectors.DefaultSelector()
    for child in children:
        assert child.proc.stdout is not None
        selector.register(child.proc.stdout, selectors.EVENT_READ, child)
    ready: dict[str, tuple[int, int]] = {}
    deadline = time.monotonic() + timeout
    while len(ready) < len(children):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"fan-out clients not ready within {timeout:.0f} s")
        for key, _ in selector.select(remaining):
            child = key.data
            line = child.proc.stdout.readline().decode().strip()
            if not line:
                selector.unregister(key.fileobj)
                raise RuntimeError(f"{child.name} exited before READY; see {child.log}")
            if line.startswith("READY"):
                _, opened, failed = line.split()
                ready[child.name] = (int(opened), int(failed))
                selector.unregister(key.fileobj)
    selector.close()
    return list(ready.values())


@dataclasses.dataclass
class _Round:
    """One timed series of status writes at one rate."""

    rate: float
    writes: list[dict[str, Any]]
    window: float
    cpu: dict[str, dict[str, float]]
    web_gc: dict[str, float]
    foreign_core_pct: float
    aof_rewrites: int


def fanout_run(
    system: System, target: Service, sockets: int, *, events: int, event_rates: tuple[float, ...],
    idle_secs: float, redis_pid: int, tmp: Path, samples: Samples,
    while_open: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Open ``sockets`` status sockets (one per order) on ``target`` and measure its RSS and
    idle CPU; then, at each of ``event_rates``, write ``events`` status changes and time
    each from just before its write to Redis to its arrival at the subscribed client.
    ``while_open`` runs last, with every socket still open (its result is kept)."""
    # redis-py's asyncio pool refuses a 101st concurrent command by default.
    redis = Redis.from_url(system.redis_url, decode_responses=True, max_connections=1000)
    store = OrderStore(redis, _driver_config(system.redis_url))
    loop = asyncio.new_event_loop()
    try:
        order_ids = loop.run_until_complete(_create_orders(store, sockets))
        rss_before, fds_before = rss_kb(target.pid), open_fds(target.pid)
        procs = max(1, math.ceil(sockets / SOCKETS_PER_CLIENT_PROCESS))
        children: list[Child] = []
        outs: list[Path] = []
        for i in range(procs):
            ids_file = tmp / f"fanout-ids-{i}.txt"
            ids_file.write_text("\n".join(order_ids[i::procs]))
            outs.append(tmp / f"fanout-{uuid.uuid4().hex[:8]}-{i}.json")
            children.append(system.spawn(
                f"fanout-{i}",
                [sys.executable, "-m", "bench.fanout_client", "--port", str(target.port),
                 "--ids", str(ids_file), "--out", str(outs[i]), "--deadline", "900"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            ))
        connect_started = time.monotonic()
        ready = read_ready_lines(children, timeout=60 + sockets / 100)
        connect_secs = time.monotonic() - connect_started
        connect_gc = target.gc_pauses(connect_started, time.monotonic())
        opened = sum(r[0] for r in ready)
        failed = sum(r[1] for r in ready)
        rss_open, fds_open = rss_kb(target.pid), open_fds(target.pid)

        # Idle cost of the open sockets; over 20 s it includes one keep-alive ping each.
        idle_before = cpu_secs(target.pid)
        time.sleep(idle_secs)
        idle_core_pct = 100 * (cpu_secs(target.pid) - idle_before) / idle_secs
        rss_idle = rss_kb(target.pid)

        plan = [(oid, status) for status in FANOUT_STATUSES for oid in order_ids]
        rounds: list[_Round] = []
        for k, rate in enumerate(event_rates):
            chunk = plan[k * events : (k + 1) * events]
            cpu_before = _cpu_snapshot({"web": target.pid, "redis": redis_pid})
            foreign_before = foreign_cpu_snapshot()
            forks_before = redis_forks(system.redis_url)
            began = time.monotonic()
            writes = loop.run_until_complete(_drive_events(store, chunk, rate))
            window = (max(w["acked"] for w in writes) - min(w["due"] for w in writes)) if writes else 0.0
            time.sleep(FANOUT_SETTLE_SECS)
            cpu_after = _cpu_snapshot({"web": target.pid, "redis": redis_pid})
            rounds.append(_Round(rate, writes, window,
                                 _cpu_figures(cpu_before, cpu_after, window or 1.0, len(writes)),
                                 target.gc_pauses(began, time.monotonic()),
                                 foreign_core_pct(foreign_before, foreign_cpu_snapshot(),
                                                  time.monotonic() - began),
                                 redis_forks(system.redis_url) - forks_before))
        rss_loaded = rss_kb(target.pid)
        during = while_open() if while_open is not None else None
        stop_fanout_clients(children)
        _wait_all(children, 60 + sockets / 500, system)
        parts = [json.loads(out.read_text()) for out in outs]
        rss_closed = rss_kb(target.pid)
    finally:
        loop.run_until_complete(redis.aclose())
        loop.close()

    arrivals: dict[tuple[str, str], list[float]] = {}
    for part in parts:
        for order_id, _seq, status, arrival in part["received"]:
            arrivals.setdefault((order_id, status), []).append(arrival)
    timed = []
    for rnd in rounds:
        delays, missing, duplicates = [], 0, 0
        for w in rnd.writes:
            got = arrivals.get((w["order_id"], w["status"]))
            if not got:
                missing += 1
                continue
            duplicates += len(got) - 1
            delays.append((got[0] - w["began"]) * 1000)
        samples.fanout[f"{sockets:,} sockets, {rnd.rate:g} events/s"] = delays
        writes = rnd.writes
        timed.append({
            "event_rate": rnd.rate,
            "events": len(writes),
            "events_applied": sum(1 for w in writes if w["applied"]),
            "achieved_event_rate": len(writes) / rnd.window if rnd.window else math.nan,
            "missing": missing,
            "duplicates": duplicates,
            "delay_ms": summarize(delays),
            "spectrum_ms": spectrum(delays),
            "write_call_ms": summarize((w["acked"] - w["began"]) * 1000 for w in writes),
            "driver_lag_ms": summarize((w["began"] - w["due"]) * 1000 for w in writes),
            "cpu": rnd.cpu,
            "web_gc": rnd.web_gc,
            "foreign_core_pct": rnd.foreign_core_pct,
            "aof_rewrites": rnd.aof_rewrites,
        })
    return {
        "sockets": sockets,
        "client_procs": procs,
        "opened": opened,
        "failed": failed,
        "connect_secs": connect_secs,
        "rss_kb": {"before": rss_before, "after_open": rss_open, "after_idle": rss_idle,
                   "after_events": rss_loaded, "after_close": rss_closed},
        "rss_per_socket_kb": (rss_open - rss_before) / opened if opened else math.nan,
        "fds": {"before": fds_before, "after_open": fds_open},
        "idle_secs": idle_secs,
        "idle_core_pct": idle_core_pct,
        "web_gc_while_connecting": connect_gc,
        "timed": timed,
        "while_open": during,
        "stop_reasons": [p["stop_reason"] for p in parts],
        "client_errors": [p["errors"] for p in parts if p["errors"]],
    }
