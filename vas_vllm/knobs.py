"""Per-request VAS knobs: `SamplingParams.extra_args` (`vllm_xargs` over HTTP).

| knob                     | type                   | meaning                                            |
|--------------------------|------------------------|----------------------------------------------------|
| `vas_beta`               | number, 0..1e6         | the paper's mean rule with strength beta           |
| `vas_tilt`               | number, 0..1e6         | exact tilt p* ∝ pi_ref exp(beta r) (distributional)|
| `vas_bon_n`              | int, 1..1e6            | Best-of-N: exact with distributional models, the   |
|                          |                        | vBoN mean rule (beta = N - 1) with bon_log_cdf ones|
| `vas_threshold`          | number or list         | exact p* ∝ pi_ref 1[r >= tau] (distributional)     |
| `vas_top_k`              | int, 1..max_top_k      | candidates re-weighted per step                    |
| `vas_model`              | name or list of names  | value models to use (names from `value_models`)    |
| `vas_weights`            | number or list         | one weight per model (composition, see below)      |
| `vas_mask_outside_top_k` | 0/1 or bool            | 1: tokens outside the top-k get -inf (default 0)   |
| `vas_rest`               | "conserve" or "keep"   | exact rules: the rest's h by conservation (default)|
|                          |                        | or the candidates' pi-weighted mean (keep: the     |
|                          |                        | top-k's total mass is left as it is)               |

At most one of vas_beta / vas_tilt / vas_bon_n / vas_threshold (the rule); none means the mean
rule at the default beta. Composition over the request's models m with weights w_m: the mean rule
adds beta * w_m * (Q_m - mean Q_m); the tilt uses beta * w_m inside each model's expectation,
log E[exp(beta w_m R_m)]; Best-of-N and the threshold raise each model's h_m to the power w_m.
The shifts of the models add up (a product of weights).

A request with no `vas_*` key is not touched. Any `vas_*` key turns VAS on for the request, with
the engine's defaults for the others. Errors are ValueError naming the knob: vLLM turns them into
HTTP 400 at admission (validate_params), before the request reaches the engine.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vas_vllm.config import VASConfig

RULE_KNOBS = ("vas_beta", "vas_tilt", "vas_bon_n", "vas_threshold")
KNOBS = (*RULE_KNOBS, "vas_top_k", "vas_model", "vas_weights", "vas_mask_outside_top_k", "vas_rest")
REST_MODES = ("conserve", "keep")
PREFIX = "vas_"
MAX_BETA = 1e6      # |beta|, |beta * w|, (N - 1) * |w|: far beyond any useful strength, far below inf
MAX_WEIGHT = 1e6
MAX_BON_N = 1_000_000
Mode = Literal["mean", "tilt", "bon", "threshold"]


class KnobError(ValueError):
    """A per-request VAS knob is invalid (becomes HTTP 400)."""


@dataclass(frozen=True)
class RequestKnobs:
    """Resolved VAS settings of one request."""

    models: tuple[str, ...]       # value-model names, in request order
    weights: tuple[float, ...]    # one per model
    mode: Mode                    # the rule (see the module doc)
    beta: float                   # mean: strength; tilt: beta; bon: N - 1; threshold: 0
    top_k: int
    mask_outside_top_k: bool
    exact: tuple[bool, ...] = ()  # per model: it contributes an exact log h (distributional head)
    bon_n: int | None = None
    taus: tuple[float, ...] | None = None  # threshold: one tau per model
    rest_keep: bool = False       # exact rules: vas_rest "keep" (see tilts.exact_shifts)

    @property
    def strengths(self) -> tuple[float, ...]:
        """beta * w per model: the mean rule's strength (and the tilt's beta per model)."""
        return tuple(self.beta * w for w in self.weights)

    @property
    def any_exact(self) -> bool:
        return any(self.exact)


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


def _per_model(knob: str, v: Any, models: list[Any]) -> list[float]:
    """A number (the same for every model) or one number per model."""
    values = [_number(knob, x) for x in _flat_list(knob, v)]
    if isinstance(v, list) and len(values) != len(models):
        raise KnobError(
            f"{knob} has {len(values)} value(s) but {len(models)} model(s) are used "
            f"(vas_model={models if models != [None] else 'default'}): give one per model")
    return values if isinstance(v, list) else values * len(models)


def _head(meta: Any) -> tuple[bool, list[float] | None]:
    """(distributional?, bins) of a model's metadata (scalar when the field is absent)."""
    dist = getattr(meta, "value_head", "scalar") == "distributional"
    return dist, (list(getattr(meta, "bins", None) or []) if dist else None)


def _check_rule(rule: str, models: list[str], metadata: Callable[[str], Any],
                taus: list[float] | None) -> tuple[bool, ...]:
    """Which models give an exact log h under `rule`; KnobError for a model that cannot serve it."""
    exact = []
    for m, meta in zip(models, map(metadata, models)):
        dist, bins = _head(meta)
        if rule == "vas_beta":
            exact.append(False)
        elif dist:
            if rule == "vas_threshold":
                tau = taus[models.index(m)]  # type: ignore[index]
                if tau > bins[-1]:
                    raise KnobError(
                        f"vas_threshold {tau} lies above model {m!r}'s largest reward bin "
                        f"{bins[-1]:g}: P(R >= tau) is 0 everywhere (its bins span "
                        f"[{bins[0]:g}, {bins[-1]:g}])")
            exact.append(True)
        elif rule == "vas_bon_n" and getattr(meta, "reward_transform", "identity") == "bon_log_cdf":
            if getattr(meta, "reward_normalization", None):
                raise KnobError(
                    f"vas_bon_n needs V in units of log F_x(r); model {m!r} was trained on a "
                    f"standardised bon_log_cdf reward ({meta.reward_normalization}), so beta = N - 1 "
                    "would not mean Best-of-N (use vas_beta)")
            exact.append(False)
        else:
            need = ("a distributional value model or one trained on the bon_log_cdf reward"
                    if rule == "vas_bon_n" else "a distributional value model")
            raise KnobError(
                f"{rule} needs {need}; model {m!r} has a scalar head with reward_transform="
                f"{getattr(meta, 'reward_transform', 'identity')!r} (use vas_beta)")
    return tuple(exact)


def parse_knobs(
    extra_args: Mapping[str, Any] | None, cfg: VASConfig | None,
    metadata: Callable[[str], Any] | None = None,
) -> RequestKnobs | None:
    """Validate a request's knobs; None when the request does not use VAS.

    With `cfg` None (the engine's configuration is unknown), checks only what the request alone
    determines. `metadata(name)` returns a model's VASMetadata (for defaults and the head kind).
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

    weights = _per_model("vas_weights", a["vas_weights"], models) if "vas_weights" in a else [1.0] * len(models)
    if "vas_weights" in a and not isinstance(a["vas_weights"], list) and len(models) > 1:
        raise KnobError(
            f"vas_weights has 1 value(s) but {len(models)} model(s) are used (vas_model={models}): "
            "give one weight per model")
    big = [w for w in weights if abs(w) > MAX_WEIGHT]
    if big:
        raise KnobError(f"vas_weights must lie in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], found {big}")

    rules = [k for k in RULE_KNOBS if k in a]
    if len(rules) > 1:
        raise KnobError(f"set one of {list(RULE_KNOBS)}, not several: found {rules} "
                        "(vas_bon_n=N with a bon_log_cdf model means beta = N - 1)")
    rule = rules[0] if rules else None
    beta: float | None = None
    bon_n: int | None = None
    taus: list[float] | None = None
    if rule in ("vas_beta", "vas_tilt"):
        beta = _number(rule, a[rule])
        if not 0.0 <= beta <= MAX_BETA:
            raise KnobError(f"{rule} must be in [0, {MAX_BETA:g}], found {beta}")
    elif rule == "vas_bon_n":
        bon_n = _integer("vas_bon_n", a["vas_bon_n"], 1, MAX_BON_N)
        beta = float(bon_n - 1)
    elif rule == "vas_threshold":
        taus = _per_model("vas_threshold", a["vas_threshold"], models)
        beta = 0.0
    if beta is not None and rule != "vas_threshold":
        strong = [w for w in weights if abs(beta * w) > MAX_BETA]
        if strong:
            raise KnobError(
                f"{rule} x vas_weights must lie in [-{MAX_BETA:g}, {MAX_BETA:g}], found "
                f"{beta:g} x {strong[0]:g}")

    max_top_k = cfg.max_top_k if cfg is not None else 1 << 30
    top_k = _integer("vas_top_k", a["vas_top_k"], 1, max_top_k) if "vas_top_k" in a else None

    mask = False
    if "vas_mask_outside_top_k" in a:
        v = a["vas_mask_outside_top_k"]
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            mask = bool(v)
        else:
            raise KnobError(f"vas_mask_outside_top_k must be 0 or 1 (or a bool), found {_type_name(v)}")

    rest_keep = False
    if "vas_rest" in a:
        v = a["vas_rest"]
        if not isinstance(v, str) or v not in REST_MODES:
            raise KnobError(f"vas_rest must be one of {list(REST_MODES)}, found {_type_name(v)}")
        if rule not in ("vas_tilt", "vas_bon_n", "vas_threshold"):
            raise KnobError(f"vas_rest applies to the exact rules (vas_tilt, vas_bon_n, vas_threshold), "
                            f"and this request uses {rule or 'the default vas_beta'}")
        rest_keep = v == "keep"

    if cfg is None:
        return None  # syntax checked; defaults and heads need the engine's configuration
    exact = (_check_rule(rule or "vas_beta", models, metadata, taus) if metadata is not None
             else (False,) * len(models))
    if "vas_rest" in a and metadata is not None and not any(exact):
        raise KnobError(f"vas_rest applies to the exact rules, and {rule} with model(s) {models} "
                        "uses the vBoN mean rule (no distributional model)")
    first = metadata(models[0]) if metadata is not None else None
    if beta is None:
        beta = cfg.default_beta if cfg.default_beta is not None else (first.default_beta if first else 1.0)
    if top_k is None:
        top_k = cfg.default_top_k if cfg.default_top_k is not None else (first.default_top_k if first else 20)
        top_k = min(top_k, cfg.max_top_k)
    mode: Mode = {"vas_tilt": "tilt", "vas_bon_n": "bon", "vas_threshold": "threshold"}.get(rule or "", "mean")  # type: ignore[assignment]
    return RequestKnobs(
        models=tuple(models), weights=tuple(weights), mode=mode, beta=beta, top_k=top_k,
        mask_outside_top_k=mask, exact=exact, bon_n=bon_n,
        taus=tuple(taus) if taus is not None else None, rest_keep=rest_keep,
    )

