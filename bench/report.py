"""Turn a run's figures into ``results.json``, ``report.md`` and ``latency.png``.

``python -m bench.report [OUT_DIR]`` writes report.md again from an earlier run's
results.json (after a change to this file, say).

Repeats are folded into medians here (per target and rate: the median of each run's
p50 and p99, the largest max), ratios to the floor are taken between those medians,
and each target of issue 4 gets a pass, a fail, or "not measured" with the reason.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.phases import GENERATOR_CPU_LIMIT, GENERATOR_LAG_LIMIT_MS, Samples
from bench.stats import median, ratio
from engine.core.config import PROJECT_ROOT

P99_LIMIT_MS = 10.0
FLOOR_RATIO_LIMIT = 1.3
E2E_TARGET_PER_SEC = 500.0
FANOUT_P99_LIMIT_MS = 25.0
CAPACITY_SOCKETS = 10_000
CAPACITY_KB_PER_SOCKET = 30.0
REFERENCE_RATE = 1000.0
# A rate is "held" when nearly all of it was achieved, every answer was a 202 and
# p99 stayed under the limit.
HELD_SHARE = 0.95


def _f(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def submit_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, rate): medians over repeats."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["target"], run["rate"])].append(run)
    rows = []
    for (target, rate), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        codes: Counter[str] = Counter()
        for r in rs:
            codes.update(r["status_counts"])
        rows.append({
            "target": target,
            "rate": rate,
            "repeats": len(rs),
            "achieved_rate": median(r["achieved_rate"] for r in rs),
            "status_counts": dict(codes),
            "all_202": set(codes) == {"202"},
            "p50_ms": median(r["latency_ms"]["p50"] for r in rs),
            "p99_ms": median(r["latency_ms"]["p99"] for r in rs),
            "max_ms": max(r["latency_ms"]["max"] for r in rs),
            "web_us_per_req": median(r["cpu"]["web"]["us_per_unit"] for r in rs),
            "web_core_pct": median(r["cpu"]["web"]["core_pct"] for r in rs),
            "redis_us_per_req": median(r["cpu"].get("redis", {}).get("us_per_unit", math.nan) for r in rs),
            "dispatch_lag_p99_ms": median(r["dispatch_lag_ms"]["p99"] for r in rs),
            "generator_core_share": median(r["generator_core_share"] for r in rs),
            "foreign_core_pct": median(r.get("foreign_core_pct", math.nan) for r in rs),
            "web_gc": _worst_gc(r.get("web_gc") for r in rs),
            "aof_rewrite_runs": sum(1 for r in rs if r.get("aof_rewrites")),
        })
    return rows


def generator_limited(row: dict[str, Any]) -> bool:
    """Whether the generator, not the server, may have set this row's latency (medians)."""
    return bool(row["dispatch_lag_p99_ms"] > GENERATOR_LAG_LIMIT_MS
                or row["generator_core_share"] > GENERATOR_CPU_LIMIT)


def held(row: dict[str, Any]) -> bool:
    return bool(row["all_202"] and row["achieved_rate"] >= HELD_SHARE * row["rate"]
                and row["p99_ms"] <= P99_LIMIT_MS)


def highest_held(rows: list[dict[str, Any]], target: str) -> float | None:
    """The highest rate held, counting only rates below which every rate was held too."""
    best = None
    for row in sorted((r for r in rows if r["target"] == target), key=lambda r: r["rate"]):
        if not held(row):
            break
        best = row["rate"]
    return best


def _row(rows: list[dict[str, Any]], target: str, rate: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["target"] == target and r["rate"] == rate), None)


def targets(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 4's targets, each with the measured figure and pass / FAIL / not measured."""
    out = []

    def add(name: str, measured: str, ok: bool | None, note: str = "") -> None:
        verdict = "not measured" if ok is None else ("pass" if ok else "**FAIL**")
        out.append({"target": name, "measured": measured, "verdict": verdict, "note": note})

    svc, flo = _row(rows, "service", REFERENCE_RATE), _row(rows, "floor", REFERENCE_RATE)
    if svc:
        add("POST p99 ≤ 10 ms at 1,000 req/s", f"{_f(svc['p99_ms'])} ms "
            f"({_f(svc['achieved_rate'], 0)}/s achieved)", held(svc))
    else:
        add("POST p99 ≤ 10 ms at 1,000 req/s", "–", None, "1,000 req/s not in the rates run")
    if svc and flo:
        r99 = ratio(svc["p99_ms"], flo["p99_ms"])
        r50 = ratio(svc["p50_ms"], flo["p50_ms"])
        add("POST p99 ≤ 1.3× the floor's at 1,000 req/s",
            f"p99 {_f(r99)}× ({_f(svc['p99_ms'])} vs {_f(flo['p99_ms'])} ms); "
            f"p50 {_f(r50)}×", not math.isnan(r99) and r99 <= FLOOR_RATIO_LIMIT)
    e2e = best_e2e(results)
    if e2e:
        add("≥ 500 orders/s end to end", f"{_f(e2e['orders_per_sec'], 0)} orders/s "
            f"(best run: {e2e['in_flight_max']} in flight, POST→terminal p99 "
            f"{_f(e2e['post_to_terminal_ms']['p99'], 0)} ms)",
            e2e["orders_per_sec"] >= E2E_TARGET_PER_SEC)
    else:
        add("≥ 500 orders/s end to end", "–", None, "phase did not run")
    fans = {f["sockets"]: f for f in results.get("fanout", [])}
    big = fans.get(CAPACITY_SOCKETS)
    largest = fans[max(fans)] if fans else None
    if big and big["timed"]:
        worst = max(big["timed"], key=lambda t: t["delay_ms"]["p99"])
        add("fan-out p99 ≤ 25 ms with 10,000 sockets", "; ".join(
            f"{_f(t['delay_ms']['p99'])} ms at {_f(t['event_rate'], 0)} events/s "
            f"({t['missing']} missing)" for t in big["timed"]),
            worst["delay_ms"]["p99"] <= FANOUT_P99_LIMIT_MS and worst["missing"] == 0)
        add("10,000 sockets in one web process at ≤ 30 KB RSS each",
            f"{big['opened']:,} open, {_f(big['rss_per_socket_kb'], 1)} KiB each",
            big["opened"] >= CAPACITY_SOCKETS and big["rss_per_socket_kb"] <= CAPACITY_KB_PER_SOCKET)
    else:
        note = "run --full for 10,000 sockets"
        if largest and largest["timed"]:
            note += (f"; with {largest['sockets']:,}: p99 "
                     f"{_f(largest['timed'][0]['delay_ms']['p99'])} ms, "
                     f"{_f(largest['rss_per_socket_kb'], 1)} KiB/socket")
        add("fan-out p99 ≤ 25 ms with 10,000 sockets", "–", None, note)
        add("10,000 sockets in one web process at ≤ 30 KB RSS each", "–", None, note)
    return out


def _delta(value: float, base: float | None) -> str:
    if base is None or value == base:
        return ""
    change = ratio(value, base) - 1
    return "" if math.isnan(change) else f" ({change:+.0%})"


def _gc(figures: dict[str, float] | None, gen2: bool = False) -> str:
    if not figures:
        return "–"
    text = f"{figures['count']:.0f}, {_f(figures['max_ms'], 1)}"
    if gen2:
        text += f" ({figures['gen2_count']:.0f}, {_f(figures['max_gen2_ms'], 1)})"
    return text


def _worst_gc(runs: Iterable[dict[str, float] | None]) -> dict[str, float] | None:
    """Over repeats: the most pauses and the longest one."""
    kept = [r for r in runs if r]
    if not kept:
        return None
    return {"count": max(r["count"] for r in kept), "max_ms": max(r["max_ms"] for r in kept),
            "gen2_count": max(r["gen2_count"] for r in kept),
            "max_gen2_ms": max(r["max_gen2_ms"] for r in kept)}


def _commands(per_unit: dict[str, float]) -> str:
    total = sum(per_unit.values())
    return f"{_f(total, 1)} in all: " + ", ".join(
        f"{name} {_f(n, 2)}" for name, n in per_unit.items() if n >= 0.01)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def best_e2e(results: dict[str, Any]) -> dict[str, Any] | None:
    """The end-to-end run with the most orders/s among those where every order finished."""
    clean = [r for r in results.get("e2e") or [] if r["finished"] == r["orders"]]
    return max(clean, key=lambda r: r["orders_per_sec"]) if clean else None


def _e2e_table(runs: list[dict[str, Any]]) -> str:

    def cpu(run: dict[str, Any], key: str, field: str) -> str:
        return " / ".join(_f(run["cpu"].get(k, {}).get(field, math.nan), 0) for k in key.split())

    figures: list[tuple[str, Any]] = [
        ("orders in flight (procs × each)",
         lambda r: f"{r['in_flight_max']} ({r['client_procs']} × {r['concurrency_per_proc']})"),
        ("orders/s (finished / window)", lambda r: _f(r["orders_per_sec"], 0)),
        ("finished", lambda r: f"{r['finished']:,} / {r['orders']:,}"),
        ("final statuses", lambda r: json.dumps(r["final_status"])),
        ("errors", lambda r: json.dumps(r["errors"]) if r["errors"] else "none"),
        ("seq gaps/repeats", lambda r: str(r["sequence_violations"])),
        ("close codes", lambda r: json.dumps(r["close_codes"])),
        ("POST→202 p50 / p99 ms", lambda r: f"{_f(r['post_ms']['p50'])} / {_f(r['post_ms']['p99'])}"),
        ("POST→first status p50 / p99 ms", lambda r: f"{_f(r['post_to_first_status_ms']['p50'])} / "
                                                   f"{_f(r['post_to_first_status_ms']['p99'])}"),
        ("POST→terminal p50 / p99 / max ms",
         lambda r: f"{_f(r['post_to_terminal_ms']['p50'])} / {_f(r['post_to_terminal_ms']['p99'])} / "
                   f"{_f(r['post_to_terminal_ms']['max'])}"),
        ("CPU per order: web / worker / redis µs", lambda r: cpu(r, "web worker redis", "us_per_unit")),
        ("core share: web / worker / redis %", lambda r: cpu(r, "web worker redis", "core_pct")),
        ("web GC pauses ≥1 ms: n, max ms", lambda r: _gc(r.get("web_gc"))),
        ("other processes' CPU (% of a core)", lambda r: _f(r.get("foreign_core_pct", math.nan), 0)),
        ("client processes' core share (each)", lambda r: f"{_f(100 * r['clients_core_share'], 0)} %"),
    ]
    header = ["figure"] + [r["label"] for r in runs]
    return _table(header, [[name] + [fn(r) for r in runs] for name, fn in figures])


def _as_run_section(run: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Phase 1b beside phase 1's service at the same rate: the same load, in the
    configuration `make run` starts and in the bench's own."""
    bench_row = _row(rows, "service", run["rate"]) if rows else None
    table_rows = [[
        "as `make run` runs it: " + " ".join(f"{k}={v}" for k, v in run.get("env", {}).items())
        + ", appendfsync always, the worker executing",
        _f(run["achieved_rate"], 0), ", ".join(f"{k}: {v}" for k, v in sorted(run["status_counts"].items())),
        _f(run["latency_ms"]["p50"]), _f(run["latency_ms"]["p99"]),
        _f(run["cpu"]["web"]["us_per_unit"], 0), _f(run["cpu"].get("worker", {}).get("core_pct", math.nan), 0),
    ]]
    if bench_row:
        table_rows.append([
            "the bench's (phase 1): LOG_LEVEL=WARNING, zero-latency venues, no worker",
            _f(bench_row["achieved_rate"], 0),
            "", _f(bench_row["p50_ms"]), _f(bench_row["p99_ms"]), _f(bench_row["web_us_per_req"], 0), "–",
        ])
    return [
        f"## 1b. Submit as `make run` runs it ({_f(run['rate'], 0)}/s, {_f(run['duration_secs'], 0)} s)",
        "",
        "The same open-loop load against a web process in the configuration users run, beside "
        "phase 1's service at the same rate.",
        "",
        _table(["configuration", "achieved/s", "status codes", "p50 ms", "p99 ms", "web CPU µs/req",
                "worker core %"], table_rows),
        "",
    ]


def render_markdown(results: dict[str, Any], rows: list[dict[str, Any]], plot: str | None) -> str:  # noqa: C901 - one section after another, each a few ifs
    m, setup = results["machine"], results.get("setup", {})
    out = [f"# Benchmark report ({results['mode']})", ""]
    git = results.get("git", {})
    out.append(f"`{results['command']}` — started {results['started']}, "
               f"{results.get('elapsed_secs', 0):.0f} s; commit `{git.get('commit')}` "
               f"({git.get('subject', '')})"
               + (f", with uncommitted changes in {', '.join(git['changed_outside_bench'])}"
                  if git.get("changed_outside_bench") else "") + ".")
    out.append("")
    out.append(_table(["machine", ""], [
        ["CPUs (nproc / usable)", f"{m['nproc']} / {m['cpus_usable']}"],
        ["CPU model", m["cpu_model"]],
        ["memory", f"{m['memory_gib']} GiB"],
        ["kernel", m["kernel"]],
        ["Python / Tornado / redis-py", f"{m['python']} / {m['tornado']} / {m['redis_py']}"],
        ["hiredis in the venv", str(m["hiredis_in_venv"])],
        ["load average at start → end",
         f"{_f(m['loadavg_start'][0])} → {_f(m.get('loadavg_end', [math.nan])[0])}"],
    ]))
    out.append("")
    if setup:
        binary = setup.get("redis_binary", "redis-server (binary not recorded)")
        out.append(f"Redis {setup.get('redis_version')}, `{binary}`, with AOF "
                   f"`appendfsync {setup.get('appendfsync')}`; service env "
                   f"`{' '.join(f'{k}={v}' for k, v in setup.get('service_env', {}).items())}`; "
                   f"worker concurrency {setup.get('worker_concurrency')}; "
                   f"{setup.get('generator_procs')} generator process(es) × "
                   f"{setup.get('connections_per_generator')} keep-alive connections; "
                   f"fd limit {setup.get('fd_limit')}.")
        out.append("")
    if results.get("errors"):
        out.append("**The run did not complete:**")
        out.append("```")
        out.extend(e.strip() for e in results["errors"])
        out.append("```")
        out.append("")

    out.append("## Targets")
    out.append("")
    out.append(_table(["target", "measured", "verdict", "note"],
                      [[t["target"], t["measured"], t["verdict"], t["note"]]
                       for t in targets(results, rows)]))
    out.append("")
    if plot:
        out.append(f"![latency]({plot})")
        out.append("")

    if rows:
        out.append("## 1. Submit: open-loop POST /api/orders/execute")
        out.append("")
        out.append("Latency from each request's *scheduled* send time to its response "
                   "(no coordinated omission); medians over repeats of each run's percentile; "
                   "`max` is the largest of any repeat. The worker is not running here. "
                   "CPU µs/req is the web process's user+system CPU per answered request.")
        out.append("")
        table_rows = []
        for r in rows:
            codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["status_counts"].items()))
            notes = ["generator-limited?"] if generator_limited(r) else []
            if r.get("aof_rewrite_runs"):
                notes.append(f"Redis AOF rewrite in {r['aof_rewrite_runs']} of {r['repeats']} runs")
            note = "; ".join(notes)
            table_rows.append([
                _f(r["rate"], 0), r["target"], _f(r["achieved_rate"], 0), codes,
                _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["max_ms"], 1),
                _f(r["web_us_per_req"], 0), _f(r["web_core_pct"], 0),
                _f(r["dispatch_lag_p99_ms"]), _gc(r.get("web_gc")), _f(r["foreign_core_pct"], 0), note,
            ])
        out.append(_table(
            ["offered/s", "target", "achieved/s", "status codes", "p50 ms", "p99 ms", "max ms",
             "web CPU µs/req", "web core %", "gen lag p99 ms", "web GC ≥1 ms: n, max",
             "others' CPU %", ""],
            table_rows))
        out.append("")
        ratio_rows = []
        for rate in sorted({r["rate"] for r in rows}):
            s, f = _row(rows, "service", rate), _row(rows, "floor", rate)
            if s and f:
                ratio_rows.append([_f(rate, 0), _f(ratio(s["p50_ms"], f["p50_ms"])),
                                   _f(ratio(s["p99_ms"], f["p99_ms"])),
                                   _f(ratio(s["web_us_per_req"], f["web_us_per_req"]))])
        out.append(_table(["offered/s", "p50 service/floor", "p99 service/floor",
                           "CPU/req service/floor"], ratio_rows))
        out.append("")
        out.append(f"Highest rate held (every answer 202, ≥ {HELD_SHARE:.0%} of the offered rate "
                   f"achieved, p99 ≤ {P99_LIMIT_MS:g} ms, and every lower rate held too): "
                   f"service **{_f(highest_held(rows, 'service') or math.nan, 0)}/s**, "
                   f"floor **{_f(highest_held(rows, 'floor') or math.nan, 0)}/s** "
                   f"(of the rates run: {', '.join(_f(x, 0) for x in sorted({r['rate'] for r in rows}))}).")
        for target in ("service", "floor"):
            run = next((r for r in results.get("submit", []) if r["target"] == target
                        and r.get("redis_commands_per_request")), None)
            if run:
                out.append("")
                out.append(f"Redis commands per POST, {target} (INFO commandstats; commands run "
                           "inside a Lua script count besides its EVALSHA): " + _commands(
                               run["redis_commands_per_request"]) + ".")
        limited = [r for r in rows if generator_limited(r)]
        if limited:
            out.append("")
            out.append("Generator check: at " + ", ".join(
                f"{r['target']} {_f(r['rate'], 0)}/s" for r in limited) +
                " the generator's timetable loop ran > 1 ms late at p99 (median over repeats) or "
                "used > 85% of a core, so part of that latency may be the generator's (or the "
                "CPU it shares with the server), not the server's.")
        out.append("")

    if results.get("as_run"):
        out.extend(_as_run_section(results["as_run"], rows))

    if results.get("e2e"):
        out.append("## 2. End to end: POST, then a WebSocket until the terminal status")
        out.append("")
        out.append("Each order: POST on a keep-alive connection, then a new WebSocket, the id, "
                   "and every status until the server's close (closed loop: a client task starts "
                   "its next order when one ends), at several numbers of orders in flight. "
                   "Worker with zero-latency venues. `burst` has more orders in flight than the "
                   "web process's Redis pool has connections (`engine.core.connections.MAX_CONNECTIONS`): "
                   "a burst must queue, not fail. CPU per order is each process's CPU time over "
                   "the run divided by the orders finished.")
        out.append("")
        out.append(_e2e_table(results["e2e"]))
        best = best_e2e(results)
        if best and best.get("redis_commands_per_order"):
            out.append("")
            out.append(f"Redis commands per order ({best['label']}; commands inside Lua scripts "
                       "count besides the EVALSHA): " + _commands(best["redis_commands_per_order"]) + ".")
        sent = results.get("e2e_sent_commands")
        if sent:
            out.append("")
            out.append(f"Commands the clients send per order (round trips' worth: a script's "
                       f"EVALSHA counts once; MONITOR over {sent['orders']} orders of a run of "
                       "their own): " + _commands(sent["sent"]) + f"; run inside scripts: "
                       f"{_f(sum(sent['in_scripts'].values()), 1)}.")
        out.append("")

    fans = results.get("fanout") or []
    if fans:
        out.append("## 3. Fan-out delay")
        out.append("")
        out.append("A fresh web process per socket count; one socket per order, each subscribed "
                   "(its `pending` status received) before timing starts. The bench then writes "
                   "status changes with `OrderStore.transition` (the worker's own write path), "
                   "open loop at each rate, each to a different order, and times each from just "
                   "before its write to the client's receipt (an upper bound: it includes the "
                   "write's own round trip, see `write call`).")
        out.append("")
        out.append(_table(
            ["sockets", "events/s (achieved)", "events", "delay p50 ms", "p99 ms", "max ms",
             "missing / dup", "write call p99 ms", "web CPU µs/event", "web core %",
             "web GC pauses ≥1 ms: n, max ms", "others' CPU %", ""],
            [[f"{f['sockets']:,}", f"{_f(t['event_rate'], 0)} ({_f(t['achieved_event_rate'], 0)})",
              f"{t['events']:,}", _f(t["delay_ms"]["p50"]), _f(t["delay_ms"]["p99"]),
              _f(t["delay_ms"]["max"], 1), f"{t['missing']} / {t['duplicates']}",
              _f(t["write_call_ms"]["p99"]), _f(t["cpu"]["web"]["us_per_unit"], 0),
              _f(t["cpu"]["web"]["core_pct"], 0), _gc(t.get("web_gc")),
              _f(t.get("foreign_core_pct", math.nan), 0),
              "Redis AOF rewrite during the round (see `write call`)" if t.get("aof_rewrites") else ""]
             for f in fans for t in f["timed"]]))
        out.append("")
        mixed = [(f["sockets"], f["while_open"]) for f in fans if f.get("while_open")]
        for count, run in mixed:
            out.append(f"With the {count:,} sockets still open, {run['orders']:,} end-to-end orders "
                       f"({run['in_flight_max']} in flight, each with its own short-lived socket):")
            out.append("")
            out.append(_e2e_table([run]))
            out.append("")
        out.append("## 4. Capacity: sockets held by one web process")
        out.append("")
        out.append("RSS (VmRSS) of the fresh web process after the orders exist, before any "
                   "socket, and once every socket is open and subscribed; the difference over the "
                   "sockets opened is the cost of one. The ceiling tried is the socket count "
                   "asked for (the process's fd limit is raised to the hard limit).")
        out.append("")
        out.append(_table(
            ["sockets asked", "opened", "failed", "connect s", "RSS before → open → after events MiB",
             "KiB/socket", "fds open", "idle web core % (over s)",
             "web GC while connecting: n, max ms (gen 2: n, max)"],
            [[f"{f['sockets']:,}", f"{f['opened']:,}", str(f["failed"]), _f(f["connect_secs"], 1),
              " → ".join(_f(f["rss_kb"][k] / 1024, 1) for k in ("before", "after_open", "after_events")),
              _f(f["rss_per_socket_kb"], 1), f"{f['fds']['after_open']:,}",
              f"{_f(f['idle_core_pct'], 1)} ({_f(f['idle_secs'], 0)} s)",
              _gc(f.get("web_gc_while_connecting"), gen2=True)] for f in fans]))
        out.append("")

    variants = results.get("variants") or []
    if variants:
        out.append("## Variants (no change to the service's files)")
        out.append("")
        out.append(f"Submit at {REFERENCE_RATE:,.0f} req/s, baseline and variant alternating; "
                   "medians over repeats.")
        out.append("")
        vrows = []
        for v in variants:
            if "skipped" in v:
                vrows.append([v["name"], v["what"], "skipped: " + v["skipped"], "", "", "", ""])
                continue
            if "error" in v:
                vrows.append([v["name"], v["what"], "failed: " + v["error"], "", "", "", ""])
                continue
            base = v["figures"]["baseline"]
            var = v["figures"][v["name"]]
            vrows.append([
                v["name"], v["what"] + (f" ({v['check']})" if v.get("check") else ""),
                f"{_f(base['p50_ms'])} → {_f(var['p50_ms'])}",
                f"{_f(base['p99_ms'])} → {_f(var['p99_ms'])}",
                f"{_f(base['web_cpu_us_per_req'], 0)} → {_f(var['web_cpu_us_per_req'], 0)} "
                f"({_f(100 * (ratio(var['web_cpu_us_per_req'], base['web_cpu_us_per_req']) - 1), 0)}%)",
                f"{base['non_202']} / {var['non_202']}",
                " / ".join(_f(x.get("foreign_core_pct", math.nan), 0) for x in (base, var)),
            ])
        out.append(_table(["variant", "what", "p50 ms", "p99 ms", "web CPU µs/req", "non-202",
                           "others' CPU %"], vrows))
        out.append("")

    e2e_var = results.get("e2e_variants")
    if e2e_var:
        out.append("## Variants end to end (hiredis, uvloop in both web and worker)")
        out.append("")
        out.append(f"{e2e_var['orders']:,} orders, {e2e_var['in_flight']} in flight, fresh web "
                   f"process and worker per run, medians of {e2e_var['repeats']} runs each.")
        out.append("")
        base = e2e_var["figures"].get("baseline", {})
        out.append(_table(
            ["config", "orders/s", "POST→terminal p99 ms", "web µs/order", "worker µs/order",
             "redis µs/order", "unfinished", "others' CPU %"],
            [[name, _f(fig["orders_per_sec"], 0) + _delta(fig["orders_per_sec"], base.get("orders_per_sec")),
              _f(fig["post_to_terminal_p99_ms"], 0),
              _f(fig["web_us_per_order"], 0) + _delta(fig["web_us_per_order"], base.get("web_us_per_order")),
              _f(fig["worker_us_per_order"], 0)
              + _delta(fig["worker_us_per_order"], base.get("worker_us_per_order")),
              _f(fig["redis_us_per_order"], 0), str(fig["unfinished"]),
              _f(fig.get("foreign_core_pct", math.nan), 0)]
             for name, fig in e2e_var["figures"].items()]))
        out.append("")

    out.extend(_scale_section(results, rows))

    prof = results.get("profile")
    if prof:
        title = (f"Profile: web process under submit load ({prof.get('secs')} s at "
                 f"{_f(prof.get('rate', math.nan), 0)} req/s)")
        out.extend(_profile_section(title, prof))
    prof_e2e = results.get("profile_e2e")
    if prof_e2e and "skipped" not in prof_e2e:
        run = prof_e2e["run"]
        for name in ("web", "worker"):
            title = (f"Profile: {name} during end to end ({prof_e2e['secs']} s, "
                     f"{_f(run['orders_per_sec'], 0)} orders/s)")
            out.extend(_profile_section(title, prof_e2e[name]))
    micro = results.get("micro")
    if micro:
        out.append("## Per-call costs of the POST's own steps (µs, microbenchmarks)")
        out.append("")
        out.append(_table(["step", "µs/call"], [[k, _f(v, 2)] for k, v in micro.items()]))
        out.append("")
    return "\n".join(out) + "\n"


def _cpu_sum(run: dict[str, Any], prefix: str, field: str) -> float:
    """A figure summed over the watched processes named ``prefix`` or ``prefix.N``."""
    values = [v[field] for k, v in run["cpu"].items() if k == prefix or k.startswith(prefix + ".")]
    return sum(values) if values else math.nan


def _scale_section(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    scale = results.get("scale") or {}
    if not scale.get("e2e") and not scale.get("submit"):
        return []
    out = ["## 6. Scale-out: web processes (WEB_CONCURRENCY) and workers", ""]
    out.append("The same end-to-end load against each shape: one port served by 1 or 2 web "
               "processes (the pre-fork supervisor), and 1 or 2 worker processes sharing the "
               "consumer group. CPU is summed over each kind's processes. On this two-core "
               "machine the clients, Redis and every process share the same two cores, so "
               "this shows how the figures move, not how they would grow on more cores.")
    out.append("")
    out.append(_table(
        ["web × worker", "orders in flight", "orders/s", "finished", "final statuses",
         "POST→terminal p50 / p99 ms", "CPU per order web / worker / redis µs",
         "core share web / worker / redis %"],
        [[f"{r['web_processes']} × {r['workers']}", str(r["in_flight_max"]),
          _f(r["orders_per_sec"], 0), f"{r['finished']:,} / {r['orders']:,}",
          json.dumps(r["final_status"]),
          f"{_f(r['post_to_terminal_ms']['p50'])} / {_f(r['post_to_terminal_ms']['p99'])}",
          " / ".join(_f(_cpu_sum(r, k, "us_per_unit"), 0) for k in ("web", "worker", "redis")),
          " / ".join(_f(_cpu_sum(r, k, "core_pct"), 0) for k in ("web", "worker", "redis"))]
         for r in scale.get("e2e", [])]))
    out.append("")
    subs = scale.get("submit") or []
    if subs:
        out.append("Submit (open loop, no worker running) with two web processes, beside one web "
                   "process's figures at the same rate from phase 1:")
        out.append("")
        table_rows = []
        for sub in subs:
            single = _row(rows, "service", sub["rate"])
            table_rows.append([
                _f(sub["rate"], 0), _f(sub["achieved_rate"], 0), json.dumps(sub["status_counts"]),
                f"{_f(sub['latency_ms']['p50'])} / {_f(sub['latency_ms']['p99'])}",
                (f"{_f(single['p50_ms'])} / {_f(single['p99_ms'])}" if single else "–"),
                _f(_cpu_sum(sub, "web", "us_per_unit"), 0),
            ])
        out.append(_table(["offered/s", "achieved/s (2 web)", "status codes (2 web)",
                           "p50 / p99 ms, 2 web", "p50 / p99 ms, 1 web", "web CPU µs/req (2 web, sum)"],
                          table_rows))
        out.append("")
    return out


def _profile_section(title: str, prof: dict[str, Any]) -> list[str]:
    out = [f"## {title}", ""]
    if "skipped" in prof:
        return out + [f"Skipped: {prof['skipped']}", ""]
    out.append(f"`{prof['file']}` (open in https://www.speedscope.app): {prof['samples']:.1f} s "
               "of non-idle samples at 200 Hz. By component (self: the frame on top of the stack; "
               "inclusive: anywhere in it):")
    out.append("")
    inclusive = dict(prof["component_inclusive_pct"])
    out.append(_table(["component", "self %", "inclusive %"], [
        [name, _f(pct, 1), _f(inclusive.get(name, math.nan), 1)]
        for name, pct in prof["component_self_pct"]]))
    out.append("")
    out.append("Top functions by self time:")
    out.append("")
    out.append(_table(["function", "self %"],
                      [[f"`{n}`", _f(p, 1)] for n, p in prof["top_self_pct"][:15]]))
    out.append("")
    ours = [(n, p) for n, p in prof.get("ours_inclusive_pct", [])][:15]
    if ours:
        out.append("Our own functions, inclusive (time in them and everything they call):")
        out.append("")
        out.append(_table(["function", "inclusive %"], [[f"`{n}`", _f(p, 1)] for n, p in ours]))
        out.append("")
    return out


def write_plot(
    results: dict[str, Any], rows: list[dict[str, Any]], samples: Samples, path: Path,
) -> str | None:
    """The four-panel latency figure; None (and a note) if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        results.setdefault("notes", []).append("latency.png skipped: matplotlib is not installed")
        return None
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for target, color in (("service", "tab:red"), ("floor", "tab:blue")):
        rs = sorted((r for r in rows if r["target"] == target), key=lambda r: r["rate"])
        if rs:
            ax.plot([r["rate"] for r in rs], [r["p99_ms"] for r in rs], "o-", color=color,
                    label=f"{target} p99")
            ax.plot([r["rate"] for r in rs], [r["p50_ms"] for r in rs], "s--", color=color,
                    alpha=0.6, label=f"{target} p50")
    ax.axhline(P99_LIMIT_MS, color="grey", linestyle=":", label="10 ms target")
    ax.set_yscale("log")
    ax.set_xlabel("offered POST rate (req/s)")
    ax.set_ylabel("latency from scheduled send (ms)")
    ax.set_title("Submit: latency vs offered rate (median over repeats)")
    ax.legend(fontsize=8)

    def spectrum_plot(ax: Any, series: dict[str, list[float]], title: str, xlabel: str) -> None:
        for label, values in series.items():
            if not values:
                continue
            ordered = sorted(values)
            n = len(ordered)
            # x = 1/(1-q): the tail gets the room (HdrHistogram's percentile plot).
            xs = [1 / (1 - (i + 0.5) / n) for i in range(n)]
            ax.plot(xs, ordered, label=f"{label} (n={n:,})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["0", "50", "90", "99", "99.9", "99.99"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.set_title(title)
        if any(series.values()):
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)

    ref = {k: v for k, v in samples.submit.items()
           if k in (f"service@{REFERENCE_RATE:g}", f"floor@{REFERENCE_RATE:g}")}
    spectrum_plot(axes[0][1], ref, f"Submit at {REFERENCE_RATE:,.0f} req/s: latency by percentile",
                  "percentile")
    spectrum_plot(axes[1][0], samples.e2e, "End to end", "percentile")
    spectrum_plot(axes[1][1], samples.fanout, "Fan-out: status written → client receives",
                  "percentile")
    fig.suptitle(f"{results['mode']} run, {results['machine']['nproc']} CPUs, "
                 f"appendfsync {results.get('setup', {}).get('appendfsync', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def write_all(results: dict[str, Any], samples: Samples, out_dir: Path) -> None:
    rows = submit_summary(results.get("submit", []))
    results["submit_summary"] = rows
    results["targets"] = targets(results, rows)
    results["highest_rate_held"] = {t: highest_held(rows, t) for t in ("service", "floor")}
    try:
        plot = write_plot(results, rows, samples, out_dir / "latency.png")
    except Exception as exc:  # noqa: BLE001 - a broken plot must not lose the figures
        results.setdefault("notes", []).append(f"latency.png failed: {exc!r}")
        plot = None
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "report.md").write_text(render_markdown(results, rows, plot))


def rebuild(out_dir: Path) -> None:
    """Write report.md again from results.json (profiles re-read from their files);
    latency.png is left as it is, since the raw samples are not kept."""
    from bench import profiling  # noqa: PLC0415 - only this entry point needs it

    results = json.loads((out_dir / "results.json").read_text())
    for key, names in (("profile", (None,)), ("profile_e2e", ("web", "worker"))):
        section = results.get(key)
        for name in names:
            prof = section if name is None else (section or {}).get(name)
            if prof and "file" in prof and (PROJECT_ROOT / prof["file"]).exists():
                prof.update(profiling.summarize_speedscope(PROJECT_ROOT / prof["file"]))
    rows = submit_summary(results.get("submit", []))
    plot = "latency.png" if (out_dir / "latency.png").exists() else None
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "report.md").write_text(render_markdown(results, rows, plot))


if __name__ == "__main__":
    import sys

    rebuild(Path(sys.argv[1]) if len(sys.argv) > 1 else PROJECT_ROOT / "bench" / "out")
