# Quick start: `make demo` runs the method end to end, `make test` runs the test suite,
# `make bench` measures throughput and memory on the CPU (about 4 minutes; writes bench.json).
# Each creates .venv and installs the project into it when needed.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.ddep-installed

.PHONY: demo test bench install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ddep demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench.py --out bench.json
