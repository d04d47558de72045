"""The shape of a Llama-family value model, read from its HF `config.json`.

Only plain JSON is read here (no transformers import), so both the transformers 4.x layout
(`rope_theta` + `rope_scaling`) and the 5.x layout (`rope_parameters`) are accepted.
RoPE variants whose frequencies depend on the running sequence length (dynamic NTK,
longrope) are refused: a cached value model needs one fixed frequency table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LLAMA_FAMILY = {"llama", "mistral"}  # same decoder block; mistral only without a sliding window
SUPPORTED_ROPE = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a value model this runtime can run exactly."""


@dataclass(frozen=True)
class LlamaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_params: tuple[tuple[str, Any], ...]  # scaling parameters, hashable
    tie_word_embeddings: bool
    hidden_act: str
    num_labels: int = 1  # width O of the score head: 1 (scalar value) or B (reward bins)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA); 1 for MHA."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], source: str = "config") -> "LlamaSpec":
        model_type = cfg.get("model_type")
        if model_type not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not a Llama-family model "
                f"(expected one of {sorted(LLAMA_FAMILY)})"
            )
        if cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True):
            raise UnsupportedModelError(f"{source}: sliding-window attention is not supported")
        if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedModelError(f"{source}: partial_rotary_factor != 1 is not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act must be 'silu' (SwiGLU), found {act!r}")
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise UnsupportedModelError(
                f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        theta, rope_type, params = _rope_settings(cfg, source)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_params=tuple(sorted(params.items())),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=act,
            num_labels=_num_labels(cfg),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlamaSpec":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no config.json in value-model folder {path}")
        return cls.from_config_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, float32 [D/2], as transformers computes them."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        params = dict(self.rope_params)
        if self.rope_type == "linear":
            return inv / float(params["factor"])
        if self.rope_type == "llama3":
            return _llama3_scale(inv, params)
        return inv


def _num_labels(cfg: dict[str, Any]) -> int:
    # transformers saves id2label (its length is num_labels); a hand-written config may say num_labels
    labels = cfg.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else int(cfg.get("num_labels", 1))


def _rope_settings(cfg: dict[str, Any], source: str) -> tuple[float, str, dict[str, Any]]:
    # transformers 5.x: rope_parameters = {"rope_type": ..., "rope_theta": ..., **scaling}
    # transformers 4.x: rope_theta at top level, rope_scaling = {"rope_type"|"type": ..., ...}
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"{source}: rope type {rope_type!r} is not supported by the cached value-model runtime "
            f"(supported: {', '.join(SUPPORTED_ROPE)}); sequence-length-dependent RoPE cannot be cached"
        )
    needed = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings"]}.get(rope_type, [])
    missing = [k for k in needed if k not in params]
    if missing:
        raise UnsupportedModelError(f"{source}: rope type {rope_type!r} needs {missing} in its parameters")
    return theta, rope_type, {k: params[k] for k in needed}


def _llama3_scale(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    # Same piecewise rule as transformers' _compute_llama3_parameters.
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_ctx = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)
