# Two entry points for a fresh clone: `make demo` (the main job on built-in data) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: install test lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e '.[test,transformers,peft,lightning,track,ray]'
	$(PIP) --no-deps 'minatar==1.0.15'

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

demo: install
	$(BIN)/ewc run permuted --data mnist-10k --tasks 10 --methods sgd,l2,ewc,online-ewc,joint --lam 100 --l2-lam 1 --jobs 2 --out runs/demo

bench: install
	$(BIN)/python benchmarks/fisher_speed.py
	$(BIN)/python benchmarks/penalty_overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
