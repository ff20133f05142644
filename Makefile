# Two commands for a new user:  `make demo` (set up + run the demo)  and  `make test` (set up + run the fast tests).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-all lint assets clean

setup: $(VENV)/.installed

# torch first (the pinned CPU build on the reference machine); the project accepts a range, so a GPU user
# can install their own CUDA build first (make TORCH="torch==2.x.y+cu12z" setup, or pip install it).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

assets: setup
	$(BIN)/fedpers assets fetch

demo: assets
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 $(BIN)/fedpers simulate --config simulations/configs/demo.toml

# The fast tier (a few minutes): every test not marked slow. test-all adds the slow tier (real
# processes, federations, deployment, faults); CI runs test-all.
test: setup
	$(BIN)/fedpers assets fetch tweets news shakespeare wnut16
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/fedpers assets fetch tweets news shakespeare wnut16
	$(PY) -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common client server simulations cli

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
