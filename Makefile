# Two commands do everything on a fresh machine with Python 3.11:
#   make run   - the whole system (embedded Redis + web + worker when REDIS_URL is unset)
#   make test  - the whole test suite, against a real redis-server it starts itself
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
# MARKET=evm's local devnet (engine/ops/devnet.py): anvil and the Uniswap V2 contracts'
# build artifacts, from npm, pinned by devnet/package.json and its lock.
DEVNET_STAMP := devnet/node_modules/.installed

.PHONY: run test worker lint bench bench-evm clean devnet-deps api-key api-keys api-key-revoke

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP) $(if $(filter evm,$(MARKET)),devnet-deps)
	$(BIN)/python server.py

worker: $(STAMP)
	$(BIN)/python worker.py

# API keys of the running system (engine/ops/api_keys.py; REDIS_URL, else the embedded
# Redis of a running `make run`). `make api-key NAME=alice [RATE=5] [BURST=10]` prints
# the new key and nothing else on stdout; `make api-keys` lists them (never the keys);
# `make api-key-revoke KEY=<id or name>` revokes one.
api-key: $(STAMP)
	@$(if $(NAME),,echo "usage: make api-key NAME=alice [RATE=calls/s] [BURST=calls]" >&2; exit 2)
	@$(BIN)/python -m engine.ops.api_keys create "$(NAME)" $(if $(RATE),--rate "$(RATE)") $(if $(BURST),--burst "$(BURST)")

api-keys: $(STAMP)
	@$(BIN)/python -m engine.ops.api_keys list

api-key-revoke: $(STAMP)
	@$(if $(KEY),,echo "usage: make api-key-revoke KEY=<key id or name>" >&2; exit 2)
	@$(BIN)/python -m engine.ops.api_keys revoke "$(KEY)"

# The lint runs first, so the structure it checks is kept (ruff.toml, mypy --strict).
test: lint devnet-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict --ignore-missing-imports server.py worker.py handlers engine

devnet-deps: $(DEVNET_STAMP)

$(DEVNET_STAMP): devnet/package.json devnet/package-lock.json
	@command -v npm >/dev/null || { echo "MARKET=evm needs npm on PATH (to install anvil and the Uniswap V2 contracts); install Node.js/npm"; exit 1; }
	npm ci --prefix devnet --no-audit --no-fund
	touch $(DEVNET_STAMP)

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/pip install --quiet -r bench/requirements.txt
	touch $(BENCH_STAMP)

# The benchmark (docs/benchmarks.md): quick mode by default, about a minute;
# `make bench BENCH_ARGS=--full` for the full report.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(or $(BENCH_ARGS),--quick)

# MARKET=evm end to end on the devnet (docs/benchmarks.md, "On a chain"), ~2 min.
bench-evm: $(BENCH_STAMP) devnet-deps
	$(BIN)/python -m bench.evm $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache bench/out devnet/node_modules
