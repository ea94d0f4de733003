# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint setup clean

setup: $(STAMP)

# Reinstall whenever pyproject.toml changes; creating the venv is idempotent.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Two pytest workers (pytest-xdist): most tests train tiny models that keep one
# core busy, so two processes halve the time on a 2-core machine (13 -> 7 min).
# --dist loadscope keeps a module on one worker, so its module-scoped fixtures
# (trained runs, the quick demo) are built once, not once per worker.
# `make test TEST_WORKERS=0` runs in one process; more workers suit more cores.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# Trains every app on its bundled sample, serves each SavedModel from a fresh
# process and runs the adding problem (~3 min on 2 cores), into runs/demo/.
# Options: `make demo DEMO_ARGS="--quick"` (a 1-2 minute smoke run), see --help.
demo: $(STAMP)
	$(PY) -m common.demo $(DEMO_ARGS)

# torch (the optional "bench" extra) adds nn.LSTM to the table; without it the
# benchmark still runs. Pass options with e.g. `make bench BENCH_ARGS=--quick`.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]" || \
		echo "note: could not install the bench extra (torch==2.13.0); running without the torch comparison"
	$(PY) benchmarks/lstm_speed.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check common apps tests benchmarks docs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
