"""Value-guided search at block boundaries (../../docs/search.md in the shared docs; README).

    from vas_vllm.search import Searcher              # over a vllm.LLM
    from vas_vllm.search import RemoteSearcher        # over any OpenAI-compatible server
    vas-vllm search / vas-vllm search-server          # the CLI and the serving front

Names resolve lazily: importing this package loads no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Searcher": "vas_vllm.search.offline",
    "RemoteSearcher": "vas_vllm.search.remote",
    "AsyncRemoteSearcher": "vas_vllm.search.remote",
    "SearchEngine": "vas_vllm.search.engine",
    "SearchOutput": "vas_vllm.search.engine",
    "SearchStats": "vas_vllm.search.engine",
    "SearchKnobs": "vas_vllm.search.knobs",
    "SearchKnobError": "vas_vllm.search.knobs",
    "parse_search_knobs": "vas_vllm.search.knobs",
    "KNOBS": "vas_vllm.search.knobs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vas_vllm.search' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
