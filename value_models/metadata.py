"""`vas.json`: what a value-model checkpoint says about itself.

A VAS value model is an ordinary HF `LlamaForSequenceClassification` folder (num_labels=1) plus
this file. It records what the runtime must check before using the model with a generator
(vocabulary size, tokenizer fingerprint) and how it was trained (reward, transform), with the
defaults a request gets when it does not set beta / top-k.

Imports only pydantic and the standard library (loaded in the vLLM API-server process).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

METADATA_FILENAME = "vas.json"
FORMAT_VERSION = 1


class MetadataError(ValueError):
    """vas.json is missing, unreadable or invalid."""


class VASMetadata(BaseModel):
    """Contents of `vas.json` beside a value-model checkpoint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    format_version: int = FORMAT_VERSION
    # Must equal the generator's config.vocab_size: Q is looked up by generator token id.
    generator_vocab_size: int = Field(gt=0)
    # sha256 of the tokenizer's (token, id) pairs and special ids; see fingerprint.py.
    tokenizer_fingerprint: str = Field(min_length=1)
    generator: str | None = None
    reward: str | None = None
    # "bon_log_cdf": trained on log F_x(r) (vBoN); decode with beta = N - 1 to mimic Best-of-N.
    reward_transform: Literal["identity", "bon_log_cdf"] = "identity"
    reward_normalization: dict[str, float] | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    default_beta: float = Field(default=1.0, ge=0.0)
    default_top_k: int = Field(default=20, ge=1)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v < 1 or v > FORMAT_VERSION:
            raise ValueError(
                f"unsupported vas.json format_version {v}: this vas-vllm reads versions 1.."
                f"{FORMAT_VERSION}; upgrade vas-vllm to use this checkpoint"
            )
        return v

    @field_validator("default_beta")
    @classmethod
    def _finite_beta(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"default_beta must be finite, found {v}")
        return v

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/vas.json`; returns the file's path."""
        path = Path(directory) / METADATA_FILENAME
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> VASMetadata:
        """Read `<directory>/vas.json`, raising MetadataError naming the file on any problem."""
        path = Path(directory) / METADATA_FILENAME
        if not path.is_file():
            raise MetadataError(
                f"{path} not found: {directory} is not a VAS value model (make one with "
                "value_models.make_value_model)"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MetadataError(f"cannot read {path}: {e}") from e
        if not isinstance(raw, dict):
            raise MetadataError(f"{path} must hold a JSON object, found {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise MetadataError(f"invalid {path}:\n{e}") from e
