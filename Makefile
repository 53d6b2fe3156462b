# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv if missing and install torch (CPU wheel pinned first), then moekd with the exact
# versions its test suite passed with (constraints.txt). `make lock` moves those versions forward.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
CONSTRAINTS := constraints.txt

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/moekd demo $(DEMO_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -n 2 $(TEST_ARGS)

# Try the newest releases: a fresh venv with everything upgraded (torch stays pinned: its CPU wheel),
# the suite run in it, and constraints.txt rewritten only if the suite passes.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade -e ".[test]"
	$(LOCK_VENV)/bin/ruff check . && $(LOCK_VENV)/bin/ruff format --check .
	$(LOCK_VENV)/bin/python -m pytest -q -n 2 $(TEST_ARGS)
	( echo "# The exact versions moekd's test suite passed with (make lock writes it; make install/test/demo use it)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' ) > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt updated; commit it with the suite's result"

.PHONY: install demo lint test lock
