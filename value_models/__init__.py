"""VAS value models: checkpoint format, compatibility checks, embedded (download-free) models.

Names are imported lazily (PEP 562): `import value_models` loads nothing heavy, and the
functions import torch / transformers only when called. The vLLM API-server process may
import this package.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # metadata
    "VASMetadata": "value_models.metadata",
    "MetadataError": "value_models.metadata",
    "METADATA_FILENAME": "value_models.metadata",
    "FORMAT_VERSION": "value_models.metadata",
    # tokenizer
    "tokenizer_fingerprint": "value_models.fingerprint",
    # checkpoint
    "make_value_model": "value_models.checkpoint",
    "resolve_model_path": "value_models.checkpoint",
    # compatibility
    "IncompatibleValueModelError": "value_models.compat",
    "check_compatible": "value_models.compat",
    "check_value_model_config": "value_models.compat",
    "load_value_model_metadata": "value_models.compat",
    # embedded models
    "cache_dir": "value_models.embedded",
    "smollm2_gguf_path": "value_models.embedded",
    "smollm2_tokenizer_dir": "value_models.embedded",
    "build_smollm2": "value_models.embedded",
    "build_tiny_pair": "value_models.embedded",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from value_models.checkpoint import make_value_model, resolve_model_path
    from value_models.compat import (
        IncompatibleValueModelError,
        check_compatible,
        check_value_model_config,
        load_value_model_metadata,
    )
    from value_models.embedded import (
        build_smollm2,
        build_tiny_pair,
        cache_dir,
        smollm2_gguf_path,
        smollm2_tokenizer_dir,
    )
    from value_models.metadata import FORMAT_VERSION, METADATA_FILENAME, MetadataError, VASMetadata
    from value_models.fingerprint import tokenizer_fingerprint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'value_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
