# One-command set-up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch installs from local disk in seconds; an unpinned torch would pull
# a multi-GB CUDA build. GPU users: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
PLUGINS := $(sort $(wildcard plugins/*/pyproject.toml))
EXAMPLES := $(sort $(wildcard examples/*/pyproject.toml))
STAMP := $(VENV)/.hookloop-installed

.PHONY: setup demo test test-slow test-stress bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS) $(EXAMPLES) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[test]" $(foreach p,$(PLUGINS) $(EXAMPLES),-e $(dir $(p)))
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hookloop demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rs -m "not slow" tests $(foreach p,$(PLUGINS) $(EXAMPLES),$(dir $(p))tests)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests $(foreach p,$(PLUGINS) $(EXAMPLES),$(dir $(p))tests)

# The distributed and signal tests, three runs in a row with every core kept busy by
# busy-loop processes (ended on every path): fails if any run fails.
STRESS_TESTS := tests/distributed plugins/hookloop-checkpoint/tests/test_resume.py \
	plugins/hookloop-checkpoint/tests/test_durability.py::test_sigkill_during_saves \
	plugins/hookloop-checkpoint/tests/test_durability.py::test_read_only_and_full_file_system
test-stress: $(STAMP)
	$(PY) tests/stress_load.py --runs 3 -- $(PY) -m pytest -q -rs -m "not slow" $(STRESS_TESTS)

bench: $(STAMP)
	$(PIP) install -q --disable-pip-version-check -e ".[bench]"
	$(PY) benchmarks/run_all.py --device cpu --out benchmarks/results/local

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
