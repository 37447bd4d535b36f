"""Interleaved A/B of source trees: is a code change worth its keep?

Starts one Redis, the floor, a web process from this checkout and one from each tree
given (e.g. a ``git worktree`` with one change), each tree on its own Redis database,
then runs the same open-loop submit load against every one in turn, alternating the
order each repeat, so all of them see the same machine. The first round warms up and
is not counted. Prints, per target, the medians of the web process's CPU per request
and of each run's p50/p99; ``--out`` keeps every run's figures as JSON.

    git worktree add /tmp/try HEAD   # then edit /tmp/try
    .venv/bin/python -m bench.ab try=/tmp/try --rate 1000 --secs 5 --repeats 4

The tables under "What falls short" in docs/benchmarks.md came from this.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.phases import Samples, submit_run
from bench.run import Interrupted, _on_signal, log
from bench.stats import median
from bench.system import Service, System, add_bench_key
from engine.core.config import PROJECT_ROOT


def parse_tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    tree = Path(path).resolve()
    if not sep or not name or not (tree / "server.py").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR, DIR holding a server.py")
    return name, tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Interleaved A/B of source trees (see docs/benchmarks.md).")
    parser.add_argument("trees", nargs="*", type=parse_tree, metavar="NAME=DIR",
                        help="trees to compare with this checkout ('this') and the floor")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered POST/s (default 1000)")
    parser.add_argument("--secs", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="counted rounds (default 3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-floor", action="store_true", help="leave the floor out")
    parser.add_argument("--pipelined-floor", action="store_true",
                        help="also the floor with its XADD over engine.core.pipelined ('floor-pipelined')")
    parser.add_argument("--out", type=Path, help="write every run's figures here (JSON)")
    args = parser.parse_args(argv)
    names = ["this", *(name for name, _ in args.trees)]
    if len(set(names)) != len(names) or {"floor", "floor-pipelined"} & set(names):
        parser.error("tree names must be unique and not 'this', 'floor' or 'floor-pipelined'")

    signal.signal(signal.SIGTERM, _on_signal)
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp_name:
        tmp = Path(tmp_name)
        system = System(tmp, "everysec")
        runs: dict[str, list[dict[str, Any]]] = {}
        targets: list[tuple[str, Service]] = []
        try:
            system.start_redis()
            base = system.redis_url.rsplit("/", 1)[0]
            if not args.no_floor:
                targets.append(("floor", system.start_floor()))
            if args.pipelined_floor:
                targets.append(("floor-pipelined", system.start_floor(pipelined=True)))
            for db, (name, tree) in enumerate([("this", PROJECT_ROOT), *args.trees], start=1):
                add_bench_key(f"{base}/{db}")  # every POST carries it (trees before keys ignore it)
                targets.append((name, system.start_web(name, redis_url=f"{base}/{db}", tree=tree)))
            for round_no in range(args.repeats + 1):
                order = targets if round_no % 2 == 0 else targets[::-1]
                for name, target in order:
                    run = submit_run(
                        system, target, name, args.rate, args.secs, procs=1,
                        connections=args.connections, watch={"web": target.pid}, tmp=tmp,
                        samples=Samples(),
                    )
                    cpu = run["cpu"]["web"]["us_per_unit"]
                    lat = run["latency_ms"]
                    log(f"round {round_no} {name:>10}: web {cpu:5.0f} us/req, p50 {lat['p50']:.3f} "
                        f"p99 {lat['p99']:.3f} ms, codes {run['status_counts']}"
                        + (" (warm-up)" if round_no == 0 else ""))
                    if round_no:
                        runs.setdefault(name, []).append(run)
        except (KeyboardInterrupt, Interrupted) as exc:
            log(f"interrupted ({exc!r}); stopping everything")
            return 130
        finally:
            system.stop_all()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    print(f"\n| target | web CPU µs/req | p50 ms | p99 ms |  ({args.repeats} × {args.secs:g} s at "
          f"{args.rate:g}/s, medians)\n|---|---|---|---|")
    for name, _ in targets:
        rows = runs.get(name, [])
        print(f"| {name} | {median(r['cpu']['web']['us_per_unit'] for r in rows):.0f} "
              f"| {median(r['latency_ms']['p50'] for r in rows):.3f} "
              f"| {median(r['latency_ms']['p99'] for r in rows):.3f} |")
    if args.out:
        for rows in runs.values():
            for r in rows:  # the raw samples would make the file large
                r.pop("spectrum_ms", None)
        args.out.write_text(json.dumps(runs, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
