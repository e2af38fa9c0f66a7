# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when missing,
# installing torch 2.13.0 (CPU wheel) before the package so that no CUDA build is pulled in.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergelab-installed

.PHONY: demo test data venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

data:
	@bash scripts/install_data.sh

# the core demo (small synthetic checkpoints, every method), then the reduced real benchmark
demo: $(STAMP) data
	HF_HUB_OFFLINE=1 $(PY) -m mergelab demo
	HF_HUB_OFFLINE=1 $(PY) -m mergelab bench --suite demo --threads 2

test: $(STAMP) data
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
