"""Benchmark harness for the order service (issue 4).

``python -m bench.run --quick`` (about a minute) or ``--full`` starts its own Redis,
web process and worker, drives them from separate load-generator processes over
loopback only, and writes ``bench/out/report.md``, ``results.json`` and
``latency.png``. See ``docs/benchmarks.md``.
"""
