# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv if missing and install torch (CPU wheel pinned first) and then moekd.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/moekd demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 $(TEST_ARGS)

.PHONY: install demo test
