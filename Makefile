# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv/ themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= torch,tensorflow,test,lightning,hf,accelerate

.PHONY: demo test lint typecheck unit bench clean

# torch first, on its own: resolved alone, `torch==2.13.0` takes the CPU build that lies on this
# machine's disk; resolved together with the test tools, pip can pick the multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.0'
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: lint typecheck unit

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/save_load.py
	$(PY) benchmarks/s3_bench.py
	$(PY) benchmarks/distributed_bench.py
	$(PY) benchmarks/incremental_bench.py
	$(PY) benchmarks/data_position_bench.py
	$(PY) benchmarks/integrations_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
