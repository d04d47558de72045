"""Read the VAS processors' state from vLLM's worker processes (documented in README).

`vas_engine_kwargs` installs `VASWorkerExtension` as vLLM's worker extension, so

    llm.collective_rpc("vas_stats")
    -> [[{"active_rows": 0, "slots_in_use": {"positive": 0}, "steps": ..., "rows_scored": ..., "fallback_rows": 0, ...}]]

returns one list per worker (one per tensor-parallel rank) with one dict per VAS processor; README
lists every key. Once every request has finished, `slots_in_use` is 0 for every model on the V1
runner; Model Runner V2 never says that a request finished, so its adapter keeps the slots of
finished requests until they are needed (evicted) or have been absent for 64 VAS steps. On the
V1 runner the worker also logs, whenever its last VAS request leaves the batch, one line on
logger "vllm.vas_vllm":

    VAS idle: slots_in_use={'positive': 0} counters={'steps': ..., 'fallback_rows': 0, ...}
"""
from __future__ import annotations

from typing import Any


def find_processors(worker: Any) -> list[Any]:
    """The VAS processor instances held by a vLLM worker (V1 runner or Model Runner V2)."""
    runner = getattr(worker, "model_runner", worker)
    found: list[Any] = []
    procs = getattr(getattr(runner, "input_batch", None), "logitsprocs", None)
    if procs is not None:  # V1 model runner
        found.extend(procs.non_argmax_invariant)
    found.extend(getattr(getattr(runner, "sampler", None), "logits_processors", None) or [])  # MRV2
    return [p for p in found if hasattr(p, "core") and hasattr(p, "stats")]


class VASWorkerExtension:
    """Mixed into vLLM's worker class (EngineArgs.worker_extension_cls)."""

    def vas_stats(self) -> list[dict[str, Any]]:
        return [p.stats() for p in find_processors(self)]
