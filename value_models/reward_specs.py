"""Rewards: a name and `score(prompts, responses) -> list[float]`, built from a spec string.

Specs (options are trailing `:key=value` parts):
    vader_positive                 VADER compound sentiment in [-1, 1] (vaderSentiment)
    textblob_polarity              TextBlob polarity in [-1, 1]
    hf:PATH_OR_HUB_ID[:label=N][:output=prob|logit][:on=pair][:batch_size=32][:device=auto]
                                   an HF sequence-classification model, scored in batches on the
                                   GPU when there is one (hf_classifier.py lists every option):
                                   softmax probability of class `label` (an index or an id2label
                                   name), or its raw logit; a one-logit model gives
                                   sigmoid(logit) for output=prob
    py:module:function             any callable f(prompts, responses) -> list[float]
Every built-in takes `:on=full` (default: score prompt + response, the text the reader sees;
responses continue the prompt verbatim) or `:on=response` (the response alone); `hf:` also takes
`:on=pair` (the two as a text pair). `py:` rewards get both lists and decide for themselves.

Rewards are built at serving time too (a residual value model, a search that names a reward),
so this module is server-side; training's dataset scoring and its cache live in
value_models/training/rewards.py.

Scores are cached beside the samples in `scores.<reward>.jsonl`, one line per sample
(prompt_id, sample, key = hash of prompt and response, score), appended and fsynced per batch:
`score_dataset` (training) computes only what is missing, so an interrupted run resumes and a re-run is free.
Heavy imports (vaderSentiment, textblob, transformers) happen when a reward is built.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable



@runtime_checkable
class Reward(Protocol):
    name: str

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class TextReward:
    """Base of the built-in rewards: scores one text per sample (prompt + response, or response)."""

    def __init__(self, name: str, on: Literal["full", "response"] = "full") -> None:
        if on not in ("full", "response"):
            raise ValueError(f"reward {name}: on must be 'full' or 'response', found {on!r}")
        self.name, self.on = name, on

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{self.name}: got {len(prompts)} prompts, {len(responses)} responses")
        texts = responses if self.on == "response" else [p + r for p, r in zip(prompts, responses)]
        return self.score_texts(list(texts))

    def score_texts(self, texts: list[str]) -> list[float]:
        raise NotImplementedError


class VaderPositive(TextReward):
    """VADER's compound score: > 0 positive, < 0 negative, in [-1, 1]."""

    def __init__(self, name: str = "vader_positive", on: Literal["full", "response"] = "full"):
        super().__init__(name, on)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score_texts(self, texts: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in texts]


class TextBlobPolarity(TextReward):
    """TextBlob's pattern-based polarity in [-1, 1] (needs no NLTK data)."""

    def __init__(self, name: str = "textblob_polarity", on: Literal["full", "response"] = "full"):
        super().__init__(name, on)
        from textblob import TextBlob

        self._blob = TextBlob

    def score_texts(self, texts: list[str]) -> list[float]:
        return [float(self._blob(t).sentiment.polarity) for t in texts]


class CallableReward:
    """`py:module:function`: f(prompts, responses) -> list[float]."""

    def __init__(self, name: str, module: str, function: str) -> None:
        self.name = name
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"reward {name}: cannot import module {module!r} ({e})") from e
        fn = getattr(mod, function, None)
        if not callable(fn):
            raise ValueError(f"reward {name}: {module}.{function} is not a callable "
                             f"(found {type(fn).__name__})")
        self.fn = fn

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(s) for s in self.fn(list(prompts), list(responses))]


REWARDS: dict[str, Callable[..., Reward]] = {
    "vader_positive": VaderPositive,
    "textblob_polarity": TextBlobPolarity,
}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: make `name[:key=value...]` a reward spec built by the decorated factory
    (called with name=<canonical spec> and the options as keyword arguments)."""
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in REWARDS or ":" in name:
            raise ValueError(f"reward name {name!r} is taken or contains ':'")
        REWARDS[name] = factory
        return factory
    return deco


def _value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _split_options(parts: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Trailing `key=value` parts become options; the rest stays positional."""
    opts: dict[str, Any] = {}
    while parts and re.fullmatch(r"[A-Za-z_]+=.*", parts[-1]):
        key, _, val = parts.pop().partition("=")
        opts[key] = _value(val)
    return parts, opts


def canonical_name(spec: str) -> str:
    """The spec with its options sorted: the name recorded in vas.json and the cache file."""
    head, opts = _split_options(spec.split(":"))
    return ":".join([*head, *(f"{k}={v}" for k, v in sorted(opts.items()))])


def parse_reward(spec: str) -> Reward:
    """Build the reward a spec names (see the module doc)."""
    name = canonical_name(spec)
    parts, opts = _split_options(spec.split(":"))
    kind = parts[0] if parts else ""
    if kind == "hf":
        if len(parts) < 2 or not parts[1]:
            raise ValueError(f"reward spec {spec!r}: expected hf:PATH_OR_ID[:label=N]...")
        from value_models.hf_classifier import HFClassifierReward

        try:
            return HFClassifierReward(name, ":".join(parts[1:]), **opts)
        except TypeError as e:
            raise ValueError(f"reward spec {spec!r}: bad options {opts} ({e})") from e
    if kind == "py":
        if len(parts) != 3 or opts:
            raise ValueError(f"reward spec {spec!r}: expected py:module:function (no options)")
        return CallableReward(name, parts[1], parts[2])
    if len(parts) == 1 and kind in REWARDS:
        try:
            return REWARDS[kind](name=name, **opts)
        except TypeError as e:
            raise ValueError(f"reward spec {spec!r}: bad options {opts} ({e})") from e
    raise ValueError(f"unknown reward spec {spec!r}: expected one of {sorted(REWARDS)}, "
                     "hf:PATH_OR_ID[:label=N][:output=prob|logit] or py:module:function")
