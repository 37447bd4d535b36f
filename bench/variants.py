"""Before/after runs of suggestions that need no change to the service's files.

Each variant starts a second web process that differs from the baseline in one way
(an environment variable, a package on its PYTHONPATH, a Redis setting, or the worker
running beside it), then runs the same open-loop submit load against the baseline
and the variant in turn, repeatedly, so both see the same machine. Packages are
installed with ``pip install --target bench/out/variants/NAME``: the service's own
venv is never changed, so no other run picks them up by accident.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.phases import (
    Samples,
    create_orders,
    e2e_run,
    flush_redis,
    read_ready_lines,
    stop_fanout_clients,
    submit_run,
    wait_worker_ready,
)
from bench.stats import median
from bench.system import Child, Service, System
from engine.ops.redis_server import RedisServer

PIP_TIMEOUT_SECS = 300
HIREDIS = "hiredis==3.5.0"
UVLOOP = "uvloop==0.23.0"
ORJSON = "orjson==3.13.0"
WATCHED_SOCKETS = 100

_UVLOOP_SITECUSTOMIZE = '''"""Bench variant: the asyncio loop is uvloop (installed beside this file)."""
import asyncio

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
'''


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    what: str


VARIANTS = (
    Variant("auth-off", "AUTH=off: no API key checked, no rate limit step (the baseline checks "
            "the bench's key and takes a call of its limit in the create script: what keys cost)"),
    Variant("log-info", "LOG_LEVEL=INFO (Tornado's access log writes a line per request)"),
    Variant("hiredis", f"{HIREDIS} on the path (redis-py then parses replies in C)"),
    Variant("uvloop", f"{UVLOOP} as the asyncio loop (via sitecustomize, no code change)"),
    Variant("fsync-other", "Redis with the other appendfsync setting (always vs everysec)"),
    Variant("worker-running", "the worker executing the accepted orders during the load"),
    Variant("watched", f"{WATCHED_SOCKETS} status sockets open on the web process, each watching "
            "an order that does not change: its status poller reads every event (with none "
            "open it only notes the stream's newest entry)"),
)


def install_target(out_dir: Path, name: str, requirement: str) -> Path | None:
    """``pip install --target out_dir/variants/name requirement`` once; the directory."""
    target = out_dir / "variants" / name
    stamp = target / ".installed"
    if stamp.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(target), requirement],
        capture_output=True, timeout=PIP_TIMEOUT_SECS, check=False,
    )
    if result.returncode != 0:
        return None
    stamp.write_text(requirement)
    return target


def uvloop_target(out_dir: Path) -> Path | None:
    """uvloop installed under out/variants, with the sitecustomize that makes it the loop."""
    path = install_target(out_dir, "uvloop", UVLOOP)
    if path is not None:
        (path / "sitecustomize.py").write_text(_UVLOOP_SITECUSTOMIZE)
    return path


def _probe(pythonpath: Path, code: str) -> str:
    """Run ``code`` in the venv's Python with ``pythonpath`` first; its output."""
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    return (result.stdout + result.stderr).strip()


@dataclasses.dataclass(frozen=True)
class Load:
    """The submit load every variant comparison runs, and where it is recorded."""

    system: System
    rate: float
    duration: float
    repeats: int
    procs: int
    connections: int
    redis_pid: int
    tmp: Path
    samples: Samples

    def run(self, target: Service, label: str, watch: dict[str, int]) -> dict[str, Any]:
        return submit_run(
            self.system, target, label, self.rate, self.duration, procs=self.procs,
            connections=self.connections, watch=watch, tmp=self.tmp, samples=self.samples,
        )


def _pair_runs(
    load: Load, base: Service, variant: Service, name: str, variant_redis_pid: int | None = None,
) -> dict[str, Any]:
    """Baseline and variant in turn (order alternating), ``load.repeats`` times each."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], name: []}
    for rep in range(load.repeats):
        order = [("baseline", base), (name, variant)]
        if rep % 2:
            order.reverse()
        for label, target in order:
            redis_pid = variant_redis_pid if target is variant and variant_redis_pid else load.redis_pid
            runs[label].append(load.run(target, f"{label} ({name})",
                                        {"web": target.pid, "redis": redis_pid}))
    return _comparison(load, runs)


def _comparison(load: Load, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"rate": load.rate, "repeats": load.repeats,
            "figures": {label: _figures(rs) for label, rs in runs.items()}, "runs": runs}


def run_variants(load: Load, base: Service, names: list[str]) -> list[dict[str, Any]]:
    """Each named variant against the baseline web process; one result per variant."""
    system = load.system
    results = []
    for variant in VARIANTS:
        if variant.name not in names:
            continue
        result: dict[str, Any] = {"name": variant.name, "what": variant.what}
        web: Service | None = None
        extra_redis: RedisServer | None = None
        try:
            if variant.name == "auth-off":
                web = system.start_web("web-auth-off", {"AUTH": "off"})
                result.update(_pair_runs(load, base, web, variant.name))
            elif variant.name == "log-info":
                web = system.start_web("web-log-info", {"LOG_LEVEL": "INFO"})
                result.update(_pair_runs(load, base, web, variant.name))
            elif variant.name in ("hiredis", "uvloop"):
                requirement = HIREDIS if variant.name == "hiredis" else UVLOOP
                if variant.name == "uvloop":
                    path = uvloop_target(system.out_dir)
                else:
                    path = install_target(system.out_dir, variant.name, requirement)
                if path is None:
                    result["skipped"] = f"pip could not install {requirement}"
                    results.append(result)
                    continue
                if variant.name == "uvloop":
                    result["check"] = _probe(
                        path, "import asyncio; print(type(asyncio.new_event_loop()).__module__)")
                else:
                    result["check"] = _probe(
                        path, "import redis.utils as u; print('HIREDIS_AVAILABLE', u.HIREDIS_AVAILABLE)")
                web = system.start_web(f"web-{variant.name}", {"PYTHONPATH": str(path)})
                result.update(_pair_runs(load, base, web, variant.name))
            elif variant.name == "fsync-other":
                other = "always" if system.appendfsync == "everysec" else "everysec"
                result["what"] = f"Redis with appendfsync {other} (baseline: {system.appendfsync})"
                extra_redis = system.start_redis(other, name=f"redis-{other}")
                assert extra_redis.process is not None
                web = system.start_web(f"web-fsync-{other}", redis_url=extra_redis.url)
                result.update(_pair_runs(load, base, web, variant.name,
                                         variant_redis_pid=extra_redis.process.pid))
            elif variant.name == "worker-running":
                result.update(_worker_pair(load, base))
            elif variant.name == "watched":
                result.update(_watched_pair(load, base))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            result["error"] = repr(exc)  # one broken variant must not lose the others
        finally:
            if web is not None:
                system.stop(web.child)
            if extra_redis is not None:
                extra_redis.stop()
        results.append(result)
    return results


def _worker_pair(load: Load, base: Service) -> dict[str, Any]:
    """The baseline web process with no worker, then with a fresh worker executing the
    orders as they arrive (competing for the same two cores, as deployed on one box)."""
    system = load.system
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "worker-running": []}
    for rep in range(load.repeats):
        order = ["baseline", "worker-running"] if rep % 2 == 0 else ["worker-running", "baseline"]
        for label in order:
            worker: Child | None = None
            watch = {"web": base.pid, "redis": load.redis_pid}
            if label == "worker-running":
                flush_redis(system.redis_url)
                worker = system.start_worker()
                wait_worker_ready(system.redis_url, worker)
                watch["worker"] = worker.pid
            try:
                runs[label].append(load.run(base, f"{label} (worker-running)", watch))
            finally:
                if worker is not None:
                    system.stop(worker)
                    flush_redis(system.redis_url)
    return _comparison(load, runs)


def _watched_pair(load: Load, base: Service) -> dict[str, Any]:
    """The baseline web process with no status socket open, then with WATCHED_SOCKETS
    of them (a fan-out client process), as a web process that also serves watchers."""
    system = load.system
    ids_file = load.tmp / "watched-ids.txt"
    ids_file.write_text("\n".join(create_orders(system.redis_url, WATCHED_SOCKETS)))
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "watched": []}
    for rep in range(load.repeats):
        order = ["baseline", "watched"] if rep % 2 == 0 else ["watched", "baseline"]
        for label in order:
            watchers: Child | None = None
            if label == "watched":
                watchers = system.spawn(
                    "watchers",
                    [sys.executable, "-m", "bench.fanout_client", "--port", str(base.port),
                     "--ids", str(ids_file), "--out", str(load.tmp / "watched-out.json"),
                     "--deadline", "300"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )
                read_ready_lines([watchers], timeout=60)
            try:
                runs[label].append(load.run(base, f"{label} (watched)",
                                            {"web": base.pid, "redis": load.redis_pid}))
            finally:
                if watchers is not None:
                    stop_fanout_clients([watchers])
                    try:
                        watchers.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        pass  # stop() below kills it
                    system.stop(watchers)
    return _comparison(load, runs)


def _figures(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over repeats of one side of a comparison."""
    return {
        "p50_ms": median(r["latency_ms"]["p50"] for r in runs),
        "p99_ms": median(r["latency_ms"]["p99"] for r in runs),
        "web_cpu_us_per_req": median(r["cpu"]["web"]["us_per_unit"] for r in runs),
        "achieved_rate": median(r["achieved_rate"] for r in runs),
        "non_202": sum(r["scheduled"] - r["ok"] for r in runs),
        "foreign_core_pct": median(r.get("foreign_core_pct", float("nan")) for r in runs),
    }


def run_e2e_variants(
    system: System, *, orders: int, procs: int, concurrency: int, repeats: int,
    worker_env: dict[str, str], redis_pid: int, tmp: Path,
) -> dict[str, Any]:
    """End to end with hiredis (and hiredis + uvloop) in both the web process and the
    worker, against the baseline; a fresh web process and worker for every run, one
    worker at a time (they share the consumer group)."""
    configs: list[tuple[str, str | None]] = [("baseline", None)]
    hiredis = install_target(system.out_dir, "hiredis", HIREDIS)
    uvloop = uvloop_target(system.out_dir)
    if hiredis is not None:
        configs.append(("hiredis", str(hiredis)))
        if uvloop is not None:
            configs.append(("hiredis+uvloop", f"{uvloop}:{hiredis}"))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    for rep in range(repeats):
        for name, pythonpath in configs if rep % 2 == 0 else list(reversed(configs)):
            env = dict(worker_env)
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            web = system.start_web(f"web-e2e-{name}", env)
            worker = system.start_worker(env)
            try:
                wait_worker_ready(system.redis_url, worker)
                runs[name].append(e2e_run(
                    system, web, name, orders, procs=procs, concurrency=concurrency,
                    watch={"web": web.pid, "worker": worker.pid, "redis": redis_pid}, tmp=tmp,
                    samples=None, deadline_secs=30 + orders / 50,
                ))
            finally:
                system.stop(worker)
                system.stop(web.child)
    figures = {}
    for name, rs in runs.items():
        figures[name] = {
            "orders_per_sec": median(r["orders_per_sec"] for r in rs),
            "post_to_terminal_p99_ms": median(r["post_to_terminal_ms"]["p99"] for r in rs),
            "web_us_per_order": median(r["cpu"]["web"]["us_per_unit"] for r in rs),
            "worker_us_per_order": median(r["cpu"]["worker"]["us_per_unit"] for r in rs),
            "redis_us_per_order": median(r["cpu"]["redis"]["us_per_unit"] for r in rs),
            "unfinished": sum(r["orders"] - r["finished"] for r in rs),
            "foreign_core_pct": median(r.get("foreign_core_pct", float("nan")) for r in rs),
        }
    return {"orders": orders, "in_flight": procs * concurrency, "repeats": repeats,
            "figures": figures, "runs": runs}
