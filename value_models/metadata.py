"""`vas.json`: what a value-model checkpoint says about itself.

A VAS value model is an ordinary HF `LlamaForSequenceClassification` folder plus this file. It
records what the runtime must check before using the model with a generator (vocabulary size,
tokenizer fingerprint), what the head predicts, how it was trained (reward, transform), and the
defaults a request gets when it does not set beta / top-k.

Two kinds of head (`value_head`):
- "scalar" (num_labels = 1): V(s), an estimate of E[R | s] (possibly transformed / standardised);
- "distributional" (num_labels = B): logits of the distribution of the terminal reward R under
  pi_ref continuing s, over B fixed reward values `bins` (ascending, in the reward's own units).
  One such model serves every exact tilt (vas_vllm/tilts.py, exact-tilts.md).
Files written before format 2 have no `value_head`: they are scalar models and load unchanged.

Imports only pydantic and the standard library (loaded in the vLLM API-server process).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METADATA_FILENAME = "vas.json"
FORMAT_VERSION = 2  # 2: value_head and bins (files of version 1 are scalar models)


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
    value_head: Literal["scalar", "distributional"] = "scalar"
    # distributional heads: the reward value of each of the B outputs, strictly ascending
    bins: list[float] | None = None
    # "residual": V(s) = r(s) + U(s), the head being U and r the `reward` applied to the text of s
    # (prompt + response so far), in the model's units (standardised with reward_normalization,
    # when set). V keeps its meaning, E[R | s]; only its parametrisation changes.
    value_parametrization: Literal["direct", "residual"] = "direct"

    @property
    def num_outputs(self) -> int:
        """Width of the checkpoint's score head: 1, or the number of bins."""
        return len(self.bins) if self.value_head == "distributional" and self.bins else 1

    @property
    def distributional(self) -> bool:
        return self.value_head == "distributional"

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

    @property
    def residual(self) -> bool:
        return self.value_parametrization == "residual"

    @model_validator(mode="after")
    def _head_consistent(self) -> VASMetadata:
        if self.residual:
            if self.value_head != "scalar" or self.reward_transform != "identity" or not self.reward:
                raise ValueError(
                    "value_parametrization 'residual' (V = r + U) needs a scalar head, the identity "
                    f"reward_transform and the reward named; found value_head {self.value_head!r}, "
                    f"reward_transform {self.reward_transform!r}, reward {self.reward!r}")
        if self.value_head == "scalar":
            if self.bins is not None:
                raise ValueError("bins are only for value_head 'distributional'; found bins on a "
                                 "scalar head")
            return self
        bins = self.bins
        if bins is None or len(bins) < 2:
            raise ValueError(f"a distributional head needs at least 2 bins, found {bins!r}")
        if not all(math.isfinite(b) for b in bins):
            raise ValueError(f"bins must be finite, found {[b for b in bins if not math.isfinite(b)]}")
        if any(b <= a for a, b in zip(bins, bins[1:])):
            raise ValueError(f"bins must be strictly ascending, found {bins}")
        if self.reward_transform != "identity" or self.reward_normalization is not None:
            raise ValueError(
                "a distributional head predicts the raw reward: reward_transform must be "
                f"'identity' and reward_normalization null, found {self.reward_transform!r} and "
                f"{self.reward_normalization!r}")
        return self

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
