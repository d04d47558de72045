"""Remote VAS: steer a generator behind an OpenAI-compatible completions API with local value
models (README "Steering a model behind an API"). `RemoteVAS` blocks, `AsyncRemoteVAS` is its
coroutine twin; `vas-vllm remote` is the command line.

The names below load on first use, so that `vas-vllm` (which imports remote.command) starts
without importing torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RemoteVASError": "api", "RemoteRequestError": "api", "RemoteUnavailableError": "api",
    "AsyncRemoteVAS": "decoder", "RemoteVAS": "decoder", "RemoteCompletion": "decoder",
    "RemoteStats": "decoder", "StepTable": "decoder",
    "IncompatibleServerError": "probe", "ResultFileError": "results",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vas_vllm.remote' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vas_vllm.remote.{_EXPORTS[name]}"), name)
