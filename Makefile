# Two commands for a fresh clone: `make demo` and `make test`.
# Both install what they need into .venv on first use (torch pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/unifyreg pretrain-toy --config configs/toy/pretrain.yaml
	$(VENV)/bin/unifyreg ablate --config configs/toy/ablate_demo.yaml

bench: $(STAMP)
	$(PY) scripts/bench_estimators.py

bench-quick: $(STAMP)
	$(PY) scripts/bench_estimators.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
