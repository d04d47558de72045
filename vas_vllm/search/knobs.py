"""Per-request search knobs (`search_*`), validated once, with errors that name the knob.

| knob                  | type                       | default                     | meaning                                  |
|-----------------------|----------------------------|-----------------------------|------------------------------------------|
| `search_rule`         | "best_of_k" or "smc"       | "best_of_k"                 | blockwise best-of-K, or block SMC        |
| `search_k`            | int, or one int per block  | 4                           | best_of_k: samples per block; smc: N     |
| `search_blocks`       | int                        | len(search_k) if a list,    | decisions (blocks) per answer            |
|                       |                            | else 2                      |                                          |
| `search_block_tokens` | int, or one int per block  | max_tokens split evenly     | new tokens per block                     |
| `search_scorer`       | name or list of names      | the default value model     | scores of the early blocks: value-model  |
|                       |                            | (else "reward")             | names, or "reward" (the partial text's)  |
| `search_weights`      | number or list of numbers  | 1 per scorer                | the scorers' weighted sum                |
| `search_value`        | "mean" or "max"            | "mean"                      | distributional models: E[R], or E[max of |
|                       |                            |                             | the samples the search still draws]      |
| `search_final`        | "reward" or "scorer"       | "reward" with a reward      | what makes the last decision             |
| `search_tau`          | number > 0                 | 0.1                         | smc: weights exp(delta score / tau)      |
| `search_ess`          | number in [0, 1]           | 0.5                         | smc: resample when ESS < ess * N         |
| `search_select`       | "argmax" or "sample"       | "argmax"                    | smc: the answer among the final particles|

Block tokens: an int M gives ceil(max_tokens / M) blocks of M (the last takes the remainder); a list
must sum to max_tokens; neither splits max_tokens evenly over `search_blocks` (earlier blocks one
longer). A per-block `search_k` list gives a schedule (AdaSearch spends more samples early).
Values arrive over HTTP as `vllm_xargs` (str, int, float or flat lists of those). Light: no torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

PREFIX = "search_"
KNOBS = ("search_rule", "search_k", "search_blocks", "search_block_tokens", "search_scorer",
         "search_weights", "search_value", "search_final", "search_tau", "search_ess",
         "search_select")
RULES = ("best_of_k", "smc")
REWARD_SCORER = "reward"   # the reward applied to the partial text
MAX_K = 256                # samples per block (best_of_k) or particles (smc)
MAX_BLOCKS = 64
MAX_WEIGHT = 1e6


class SearchKnobError(ValueError):
    """A per-request search knob is invalid (HTTP 400 in the server)."""


@dataclass(frozen=True)
class Block:
    tokens: int    # new tokens drawn per particle in this block (M)
    k: int         # best_of_k: samples per particle (K); smc: 1


@dataclass(frozen=True)
class SearchKnobs:
    """The resolved search of one request."""

    rule: Literal["best_of_k", "smc"]
    blocks: tuple[Block, ...]
    particles: int                       # smc: N; best_of_k: 1
    scorers: tuple[str, ...]             # value-model names and/or "reward"
    weights: tuple[float, ...]
    value_stat: Literal["mean", "max"]
    final_reward: bool                   # the true reward makes the last decision
    tau: float = 0.1
    ess: float = 0.5
    select: Literal["argmax", "sample"] = "argmax"

    @property
    def max_tokens(self) -> int:
        return sum(b.tokens for b in self.blocks)

    @property
    def uses_reward(self) -> bool:
        return self.final_reward or REWARD_SCORER in self.scorers

    @property
    def value_models(self) -> tuple[str, ...]:
        return tuple(s for s in self.scorers if s != REWARD_SCORER)


def wants_search(args: Mapping[str, Any] | None) -> bool:
    return bool(args) and any(isinstance(k, str) and k.startswith(PREFIX) for k in args)


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise SearchKnobError(f"{name} must be an integer, found {type(v).__name__} {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise SearchKnobError(f"{name} must be an integer, found {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise SearchKnobError(f"{name} must be an integer, found {v!r}")
    if not lo <= int(f) <= hi:
        raise SearchKnobError(f"{name} must be in [{lo}, {hi}], found {int(f)}")
    return int(f)


def _float(name: str, v: Any, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise SearchKnobError(f"{name} must be a number, found {type(v).__name__} {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise SearchKnobError(f"{name} must be a number, found {v!r}") from None
    if not math.isfinite(f) or f > hi or f < lo or (open_lo and f == lo):
        bracket = "(" if open_lo else "["
        raise SearchKnobError(f"{name} must be a finite number in {bracket}{lo:g}, {hi:g}], found {v!r}")
    return f


def _choice(name: str, v: Any, options: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in options:
        raise SearchKnobError(f"{name} must be one of {list(options)}, found {v!r}")
    return v


def _list(name: str, v: Any) -> list[Any]:
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    if not items:
        raise SearchKnobError(f"{name} must not be an empty list")
    if any(isinstance(x, (list, tuple, dict)) for x in items):
        raise SearchKnobError(f"{name} must be a value or a flat list, found {v!r}")
    return items


def _blocks(args: Mapping[str, Any], max_tokens: int, ks: list[int] | None) -> list[int]:
    """Tokens per block."""
    n_blocks = None
    if "search_blocks" in args:
        n_blocks = _int("search_blocks", args["search_blocks"], 1, MAX_BLOCKS)
    if ks is not None and len(ks) > 1:
        if n_blocks is not None and n_blocks != len(ks):
            raise SearchKnobError(f"search_blocks is {n_blocks} but search_k lists {len(ks)} blocks")
        n_blocks = len(ks)
    if "search_block_tokens" in args:
        raw = _list("search_block_tokens", args["search_block_tokens"])
        if len(raw) == 1 and not isinstance(args["search_block_tokens"], (list, tuple)):
            m = _int("search_block_tokens", raw[0], 1, max_tokens)
            sizes = [m] * (max_tokens // m) + ([max_tokens % m] if max_tokens % m else [])
        else:
            sizes = [_int("search_block_tokens", x, 1, max_tokens) for x in raw]
            if sum(sizes) != max_tokens:
                raise SearchKnobError(f"search_block_tokens {sizes} must sum to max_tokens "
                                      f"{max_tokens}, found {sum(sizes)}")
        if n_blocks is not None and n_blocks != len(sizes):
            raise SearchKnobError(f"search_block_tokens gives {len(sizes)} blocks of {sizes} "
                                  f"but search_blocks / search_k ask for {n_blocks}")
        return sizes
    n_blocks = n_blocks or 2
    if n_blocks > max_tokens:
        raise SearchKnobError(f"search_blocks {n_blocks} exceeds max_tokens {max_tokens}: every "
                              "block needs at least one token")
    base, extra = divmod(max_tokens, n_blocks)
    return [base + (1 if b < extra else 0) for b in range(n_blocks)]


def parse_search_knobs(
    args: Mapping[str, Any] | None, *, max_tokens: int, value_models: Mapping[str, Any],
    default_model: str | None, reward: str | None, reward_partial: bool = True,
    distributional: Mapping[str, bool] | None = None,
) -> SearchKnobs | None:
    """The request's search, or None when it sets no `search_*` knob.

    value_models: the configured value models (names); default_model: the one a request gets
    when it names no scorer; reward: the configured reward's name (None: none); reward_partial:
    whether that reward can score a partial text; distributional: per model, whether its head is
    distributional (search_value "max" needs it). Raises SearchKnobError naming the knob.
    """
    if not wants_search(args):
        return None
    assert args is not None
    unknown = [k for k in args if isinstance(k, str) and k.startswith(PREFIX) and k not in KNOBS]
    if unknown:
        raise SearchKnobError(f"unknown search knob(s) {unknown}; known: {list(KNOBS)}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise SearchKnobError(f"max_tokens must be a positive integer for a search, found {max_tokens!r}")
    rule = _choice("search_rule", args.get("search_rule", "best_of_k"), RULES)
    ks: list[int] | None = None
    if "search_k" in args:
        raw = args["search_k"]
        if rule == "smc" and isinstance(raw, (list, tuple)):
            raise SearchKnobError(f"search_k is the particle count N with search_rule 'smc': one "
                                  f"integer, found {raw!r}")
        ks = [_int("search_k", x, 1, MAX_K) for x in _list("search_k", raw)]
    sizes = _blocks(args, max_tokens, ks if ks is not None and len(ks) > 1 else None)
    if rule == "smc":
        particles = ks[0] if ks else 4
        blocks = tuple(Block(m, 1) for m in sizes)
    else:
        particles = 1
        per_block = ks if ks is not None and len(ks) > 1 else [ks[0] if ks else 4] * len(sizes)
        blocks = tuple(Block(m, k) for m, k in zip(sizes, per_block))
    if "search_scorer" in args:
        names = [x for x in _list("search_scorer", args["search_scorer"])]
        for x in names:
            if not isinstance(x, str):
                raise SearchKnobError(f"search_scorer must name value models or {REWARD_SCORER!r}, found {x!r}")
    elif default_model is not None:
        names = [default_model]
    else:
        names = [REWARD_SCORER]
    for x in names:
        if x != REWARD_SCORER and x not in value_models:
            raise SearchKnobError(f"search_scorer {x!r} is not a value model of this server "
                                  f"({sorted(value_models)}) nor {REWARD_SCORER!r}")
    if len(set(names)) != len(names):
        raise SearchKnobError(f"search_scorer lists a scorer twice: {names}")
    if "search_weights" in args:
        weights = [_float("search_weights", x, -MAX_WEIGHT, MAX_WEIGHT)
                   for x in _list("search_weights", args["search_weights"])]
        if len(weights) != len(names):
            raise SearchKnobError(f"search_weights has {len(weights)} weight(s) for {len(names)} "
                                  f"scorer(s) {names}")
    else:
        weights = [1.0] * len(names)
    value_stat = _choice("search_value", args.get("search_value", "mean"), ("mean", "max"))
    if value_stat == "max":
        flat = [x for x in names if x != REWARD_SCORER and not (distributional or {}).get(x, False)]
        if flat:
            raise SearchKnobError(f"search_value 'max' needs distributional value models; {flat} "
                                  "predict a single value")
    default_final = "reward" if reward is not None else "scorer"
    final = _choice("search_final", args.get("search_final", default_final), ("reward", "scorer"))
    knobs = SearchKnobs(rule=rule, blocks=blocks, particles=particles, scorers=tuple(names),
                        weights=tuple(weights), value_stat=value_stat,  # type: ignore[arg-type]
                        final_reward=final == "reward")
    smc_only = [k for k in ("search_tau", "search_ess", "search_select") if k in args]
    if rule != "smc" and smc_only:
        raise SearchKnobError(f"{smc_only} only apply to search_rule 'smc' (this request uses {rule!r})")
    if rule == "smc":
        knobs = SearchKnobs(
            **{**knobs.__dict__,
               "tau": _float("search_tau", args.get("search_tau", 0.1), 0.0, 1e6, open_lo=True),
               "ess": _float("search_ess", args.get("search_ess", 0.5), 0.0, 1.0),
               "select": _choice("search_select", args.get("search_select", "argmax"),
                                 ("argmax", "sample"))})
    if knobs.uses_reward and reward is None:
        what = ("search_scorer 'reward'" if REWARD_SCORER in names
                else "search_final 'reward'")
        raise SearchKnobError(f"{what} needs a reward, and none is configured (start with a reward, "
                              "or use search_final 'scorer' with a value-model scorer)")
    if REWARD_SCORER in names and not reward_partial:
        raise SearchKnobError(f"search_scorer 'reward': the reward {reward!r} cannot score a partial "
                              "text (it declares accepts_partial_text = False)")
    return knobs
