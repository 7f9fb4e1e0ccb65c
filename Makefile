# The two commands a new user needs: `make run` and `make test`. Each builds the environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU install path: torch comes from the pinned CPU wheel, never the multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints/cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ddm-anomaly serve

lint: $(STAMP)
	$(BIN)/ruff format --check app tests benchmarks
	$(BIN)/ruff check app tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
