#!/usr/bin/env bash
# Value scoring vs a Llama-2-7B decode step at real shapes on the GPU machine (issue E, part 3).
# Needs only this repo's files, torch and safetensors (which vas_vllm.runtime imports; it comes with
# transformers): no vLLM, no network, no model files (weights are random, built on the GPU).
# Run from anywhere:  bash scripts/run_gpu_scale.sh [extra args, e.g. --batch 64 --prefix 1024]
# Writes benchmarks/results/gpu_scale.json and prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi -L || true
PYTHONPATH=. "$PYTHON" -m benchmarks.gpu_scale --device cuda --out benchmarks/results/gpu_scale.json "$@"
