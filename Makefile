# Two commands do everything on a fresh machine with Python 3.11:
#   make run   - the whole system (embedded Redis + web + worker when REDIS_URL is unset)
#   make test  - the whole test suite, against a real redis-server it starts itself
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: run test worker lint bench clean

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python server.py

worker: $(STAMP)
	$(BIN)/python worker.py

# The lint runs first, so the structure it checks is kept (ruff.toml, mypy --strict).
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict --ignore-missing-imports server.py worker.py handlers engine

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/pip install --quiet -r bench/requirements.txt
	touch $(BENCH_STAMP)

# The benchmark (docs/benchmarks.md): quick mode by default, about a minute;
# `make bench BENCH_ARGS=--full` for the full report.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(or $(BENCH_ARGS),--quick)

clean:
	rm -rf $(VENV) data .pytest_cache bench/out
