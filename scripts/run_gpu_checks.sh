#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go (issues H and J): the value-model runtime on CUDA
# (exact against the reference, no host syncs per step), value-model training on CUDA (bf16,
# resume, reload, the memory estimate against the measured peak; DDP/FSDP with 2+ GPUs), then the
# 7B-shape scoring benchmark. Needs torch, transformers, safetensors, tokenizers, pytest, plus
# accelerate and peft for the training tests (skipped without them); no vLLM, no network.
# Run from anywhere:  bash scripts/run_gpu_checks.sh      (about 5 minutes on one H100)
# Writes benchmarks/results/gpu_scale.json; the test outcomes are in the output.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi -L || { echo "no GPU: nothing to check"; exit 1; }
status=0
PYTHONPATH=.:tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_runtime_cuda.py tests/test_train_cuda.py -rs || status=$?
bash scripts/run_gpu_scale.sh "$@" || status=$?
exit $status
