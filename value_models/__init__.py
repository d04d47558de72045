"""VAS value models.

Two parts, visible in the folder tree:
- `value_models/` itself: what the plugin and the vLLM server import. The checkpoint format
  (metadata.py, vas.json), making and loading checkpoints (checkpoint.py), compatibility checks
  (compat.py, fingerprint.py), the LoRA delta format (delta.py), and the embedded (download-free)
  models (embedded.py, cache_build.py, artifacts/).
- `value_models/training/`: everything that makes a value model (prompts, sampling, rewards,
  TD(lambda), the vBoN transform, the trainer and its config, evaluation, recipes/). The server
  never imports it (tests/test_metadata.py checks both at import and in the source).

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
    "build_positive": "value_models.embedded",
    "build_positive_bon": "value_models.embedded",
    "build_positive_dist": "value_models.embedded",
    "build_positive_residual": "value_models.embedded",
    "build_value_artifact": "value_models.embedded",
    # rewards (built by training, and at serving time by residual value models and the search)
    "Reward": "value_models.reward_specs",
    "parse_reward": "value_models.reward_specs",
    "register_reward": "value_models.reward_specs",
    # training (value_models/training/): data, reward scoring, TD(lambda), the trainer
    "heldout_prompts": "value_models.training.prompts",
    "train_prompts": "value_models.training.prompts",
    "load_prompts": "value_models.training.prompts",
    "generate_dataset": "value_models.training.sampling",
    "score_dataset": "value_models.training.rewards",
    "bon_log_cdf": "value_models.training.bon",
    "lambda_returns": "value_models.training.td",
    "train_value_model": "value_models.training.trainer",
    "SampleConfig": "value_models.training.train_config",
    "ScoreConfig": "value_models.training.train_config",
    "TrainConfig": "value_models.training.train_config",
    "PipelineConfig": "value_models.training.train_config",
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
    from value_models.training.bon import bon_log_cdf
    from value_models.embedded import (
        build_positive,
        build_positive_bon,
        build_positive_dist,
        build_positive_residual,
        build_smollm2,
        build_tiny_pair,
        build_value_artifact,
        cache_dir,
        smollm2_gguf_path,
        smollm2_tokenizer_dir,
    )
    from value_models.metadata import FORMAT_VERSION, METADATA_FILENAME, MetadataError, VASMetadata
    from value_models.fingerprint import tokenizer_fingerprint
    from value_models.training.prompts import heldout_prompts, load_prompts, train_prompts
    from value_models.reward_specs import Reward, parse_reward, register_reward
    from value_models.training.rewards import score_dataset
    from value_models.training.sampling import generate_dataset
    from value_models.training.td import lambda_returns
    from value_models.training.train_config import PipelineConfig, SampleConfig, ScoreConfig, TrainConfig
    from value_models.training.trainer import train_value_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'value_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
