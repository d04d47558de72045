"""Per-request VAS knobs: `SamplingParams.extra_args` (`vllm_xargs` over HTTP).

| knob                     | type                   | meaning                                            |
|--------------------------|------------------------|----------------------------------------------------|
| `vas_beta`               | number, 0..1e6         | strength beta (vLLM applies temperature after VAS, |
|                          |                        | so the effective strength is beta / T)             |
| `vas_top_k`              | int, 1..max_top_k      | candidates re-weighted per step                    |
| `vas_model`              | name or list of names  | value models to use (names from `value_models`)    |
| `vas_weights`            | number or list         | one weight per model: logits += beta * sum w_i Q_i |
| `vas_bon_n`              | int, 1..1e6            | for `bon_log_cdf` models only: beta = N - 1        |
| `vas_mask_outside_top_k` | 0/1 or bool            | 1: tokens outside the top-k get -inf (default 0)   |

A request with no `vas_*` key is not touched. Any `vas_*` key turns VAS on for the request, with
the engine's defaults for the others. Errors are ValueError naming the knob: vLLM turns them into
HTTP 400 at admission (validate_params), before the request reaches the engine.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vas_vllm.config import VASConfig

KNOBS = ("vas_beta", "vas_top_k", "vas_model", "vas_weights", "vas_bon_n", "vas_mask_outside_top_k")
PREFIX = "vas_"
MAX_BETA = 1e6
MAX_BON_N = 1_000_000


class KnobError(ValueError):
    """A per-request VAS knob is invalid (becomes HTTP 400)."""


@dataclass(frozen=True)
class RequestKnobs:
    """Resolved VAS settings of one request."""

    models: tuple[str, ...]       # value-model names, in request order
    strengths: tuple[float, ...]  # beta * w_i, one per model
    top_k: int
    mask_outside_top_k: bool
    beta: float


def wants_vas(extra_args: Mapping[str, Any] | None) -> bool:
    return bool(extra_args) and any(isinstance(k, str) and k.startswith(PREFIX) for k in extra_args)


def _type_name(v: Any) -> str:
    return f"{type(v).__name__} {v!r}" if not isinstance(v, (dict, list)) else type(v).__name__


def _number(knob: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise KnobError(f"{knob} must be a number, found {_type_name(v)}")
    if not math.isfinite(v):
        raise KnobError(f"{knob} must be finite, found {v}")
    return float(v)


def _integer(knob: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise KnobError(f"{knob} must be an integer, found {_type_name(v)}")
    if not lo <= v <= hi:
        raise KnobError(f"{knob} must be in [{lo}, {hi}], found {v}")
    return v


def _flat_list(knob: str, v: Any) -> list[Any]:
    items = v if isinstance(v, list) else [v]
    if not items:
        raise KnobError(f"{knob} must not be an empty list")
    for item in items:
        if isinstance(item, (list, dict, tuple)) or item is None:
            raise KnobError(f"{knob} takes a value or a flat list of values, found {_type_name(item)} inside")
    return items


def parse_knobs(
    extra_args: Mapping[str, Any] | None, cfg: VASConfig | None,
    metadata: Callable[[str], Any] | None = None,
) -> RequestKnobs | None:
    """Validate a request's knobs; None when the request does not use VAS.

    With `cfg` None (the engine's configuration is unknown), checks only what the request alone
    determines. `metadata(name)` returns a model's VASMetadata (for defaults and vas_bon_n).
    """
    if not wants_vas(extra_args):
        return None
    assert extra_args is not None
    unknown = sorted(k for k in extra_args if isinstance(k, str) and k.startswith(PREFIX) and k not in KNOBS)
    if unknown:
        raise KnobError(f"unknown VAS knob(s) {unknown}; known: {list(KNOBS)}")
    a = extra_args

    if "vas_model" in a:
        models = _flat_list("vas_model", a["vas_model"])
        for m in models:
            if not isinstance(m, str) or not m:
                raise KnobError(f"vas_model must be a model name or a list of names, found {_type_name(m)}")
        if len(set(models)) != len(models):
            raise KnobError(f"vas_model lists a model twice: {models}")
        if cfg is not None:
            missing = [m for m in models if m not in cfg.value_models]
            if missing:
                raise KnobError(f"vas_model {missing} not loaded; this server has {cfg.model_names}")
    else:
        models = [cfg.default_model_name] if cfg is not None else [None]

    if "vas_weights" in a:
        weights = [_number("vas_weights", w) for w in _flat_list("vas_weights", a["vas_weights"])]
        if len(weights) != len(models):
            raise KnobError(
                f"vas_weights has {len(weights)} value(s) but {len(models)} model(s) are used "
                f"(vas_model={models if models != [None] else 'default'}): give one weight per model")
    else:
        weights = [1.0] * len(models)

    if "vas_beta" in a and "vas_bon_n" in a:
        raise KnobError("set vas_beta or vas_bon_n, not both (vas_bon_n=N means beta = N - 1)")
    beta: float | None = None
    if "vas_beta" in a:
        beta = _number("vas_beta", a["vas_beta"])
        if not 0.0 <= beta <= MAX_BETA:
            raise KnobError(f"vas_beta must be in [0, {MAX_BETA:g}], found {beta}")
    if "vas_bon_n" in a:
        beta = float(_integer("vas_bon_n", a["vas_bon_n"], 1, MAX_BON_N) - 1)
        if cfg is not None and metadata is not None:
            for m in models:
                transform = metadata(m).reward_transform
                if transform != "bon_log_cdf":
                    raise KnobError(
                        f"vas_bon_n needs value models trained on the bon_log_cdf reward; "
                        f"model {m!r} has reward_transform={transform!r} (use vas_beta)")

    max_top_k = cfg.max_top_k if cfg is not None else 1 << 30
    top_k = _integer("vas_top_k", a["vas_top_k"], 1, max_top_k) if "vas_top_k" in a else None

    mask = False
    if "vas_mask_outside_top_k" in a:
        v = a["vas_mask_outside_top_k"]
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            mask = bool(v)
        else:
            raise KnobError(f"vas_mask_outside_top_k must be 0 or 1 (or a bool), found {_type_name(v)}")

    if cfg is None:
        return None  # syntax checked; defaults need the engine's configuration
    first = metadata(models[0]) if metadata is not None else None
    if beta is None:
        beta = cfg.default_beta if cfg.default_beta is not None else (first.default_beta if first else 1.0)
    if top_k is None:
        top_k = cfg.default_top_k if cfg.default_top_k is not None else (first.default_top_k if first else 20)
        top_k = min(top_k, cfg.max_top_k)
    return RequestKnobs(
        models=tuple(models), strengths=tuple(beta * w for w in weights), top_k=top_k,
        mask_outside_top_k=mask, beta=beta,
    )

