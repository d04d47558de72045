"""vas-vllm: Value Augmented Sampling as a vLLM logits processor.

    from vas_vllm import VASProcessor, vas_engine_kwargs

Names are resolved lazily, so `import vas_vllm` stays light (vLLM imports the processor class in
its API-server process only to run validate_params).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VASProcessor": "vas_vllm.processor",        # either runner: builds the adapter vLLM needs
    "VASProcessorV1": "vas_vllm.processor_v1",
    "VASProcessorV2": "vas_vllm.processor_v2",
    "VASConfig": "vas_vllm.config",
    "vas_engine_kwargs": "vas_vllm.config",
    "KNOBS": "vas_vllm.knobs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vas_vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
