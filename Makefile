# Two commands set everything up: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned on the same pip line so pip takes the CPU wheel here (a bare range pulls a CUDA build).
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -e ".[test]"
	@touch $(STAMP)

quickstart: install
	$(BIN)/align pipeline configs/pipelines/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/sft_vs_trl.py --quick

clean:
	rm -rf runs .pytest_cache
