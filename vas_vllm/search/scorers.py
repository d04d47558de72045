"""What ranks particles at block boundaries: value models, the reward of the partial text, or a
weighted sum of them; and the true reward that makes the last decision.

- **Value models** run on the plugin's own ValueRuntime: every particle owns a cache slot holding
  prompt + its tokens. A child continues its parent's slot (`ValueRuntime.fork` copies the
  parent's K/V, then a catch-up forward computes only the child's new tokens), so scoring K
  children of M tokens costs K * M value-model tokens, and the kept child's cache is the next
  block's parent: committed on accept, never recomputed. Each output equals a full forward of
  the particle's text up to float rounding (tests/test_search_scorers.py).
  Values are in reward units: a scalar model's output is de-standardised with its vas.json
  `reward_normalization`; a distributional model gives E[R] = sum_b p_b r_b, or with
  search_value "max" the expected best of the n samples the search still draws,
  E[max of n] = sum_b r_b (C_b^n - C_(b-1)^n), C the predicted CDF: the value of the search still
  to come rather than of one continuation. Models trained on a transformed reward
  (`bon_log_cdf`) are refused: their outputs are not in reward units. A residual model
  (V = r + U, vas_vllm/residual.py) adds its reward of the particle's text.
- **The reward of the partial text** (ARGS, 2402.01694): the configured reward applied to the
  prompt and the decoded tokens so far. The built-in rewards (vader_positive, textblob_polarity,
  hf:...) and `py:` functions accept any text; a `py:` function that cannot score a partial answer
  says so with an attribute `accepts_partial_text = False` and is then refused as a scorer.
- **A weighted sum** of any of these (search_weights), e.g. the partial-text reward plus a
  learned correction.

Shape key: n particles, O head outputs.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vas_vllm.runtime import ValueRuntime
from vas_vllm.search.knobs import REWARD_SCORER, SearchKnobs
from vas_vllm.search.rules import Particle

logger = logging.getLogger("vas_vllm.search")


def accepts_partial_text(reward: Any) -> bool:
    """Whether a reward can score a partial answer (the built-ins can; see the module doc)."""
    fn = getattr(reward, "fn", None)
    return bool(getattr(reward, "accepts_partial_text", getattr(fn, "accepts_partial_text", True)))


def expected_max(probs: np.ndarray, bins: np.ndarray, n: int) -> np.ndarray:
    """E[max of n iid draws] of binned distributions: probs [R, O], bins [O] -> [R] (float64).
    n = 1 gives the mean."""
    p = probs.astype(np.float64)
    c = np.clip(np.cumsum(p, axis=-1) / p.sum(-1, keepdims=True), 0.0, 1.0)   # [R, O]: C_b
    prev = np.concatenate([np.zeros_like(c[:, :1]), c[:, :-1]], axis=-1)    # [R, O]: C_(b-1)
    return ((c ** n - prev ** n) * bins.astype(np.float64)).sum(-1)


@dataclass
class ScorerStats:
    value_tokens: int = 0        # tokens run through value models (catch-up forwards)
    reward_calls: int = 0        # texts scored by the reward (partial and final)
    forks: int = 0


class ValueModelScorer:
    """One value model over particles, with a cache slot per particle (see the module doc)."""

    def __init__(self, name: str, runtime: ValueRuntime, metadata: Any, residual: Any = None) -> None:
        """residual: the model's ResidualReward (vas_vllm/residual.py) when it is residual."""
        if getattr(metadata, "reward_transform", "identity") != "identity":
            raise ValueError(f"value model {name!r} predicts a transformed reward "
                             f"({metadata.reward_transform}), not the reward itself: it cannot rank "
                             "particles against finished answers' rewards in a search")
        self.name, self.rt, self.meta = name, runtime, metadata
        self.bins = (np.asarray(metadata.bins, dtype=np.float64)
                     if getattr(metadata, "value_head", "scalar") == "distributional" else None)
        norm = getattr(metadata, "reward_normalization", None) or {}
        self.scale, self.shift = float(norm.get("std", 1.0)), float(norm.get("mean", 0.0))
        if getattr(metadata, "residual", False) and residual is None:
            raise ValueError(f"value model {name!r} is residual (V = r + U): pass its ResidualReward")
        self.residual = residual
        self.slots: dict[int, int] = {}   # pid -> slot

    def outputs(self, prompt_ids: Sequence[Sequence[int]], particles: Sequence[Particle]) -> torch.Tensor:
        """Head outputs at each particle's last token: [n, O] float32."""
        slots = []
        for p in particles:
            slot = self.slots.get(p.pid)
            if slot is None:
                parent = self.slots.get(p.parent) if p.parent is not None else None
                slot = self.rt.fork(parent) if parent is not None else self.rt.allocate()
                self.slots[p.pid] = slot
            slots.append(slot)
        before = self.rt.stats["extend_tokens"]
        self.rt.sync(slots, [list(prompt_ids[p.prompt]) + p.tokens for p in particles])
        self.extended = self.rt.stats["extend_tokens"] - before
        return self.rt.prefix_outputs(slots)

    def values(self, prompt_ids: Sequence[Sequence[int]], particles: Sequence[Particle],
               stat: str = "mean", remaining: int = 1) -> np.ndarray:
        """Values in reward units: [n] float64."""
        out = self.outputs(prompt_ids, particles).double()                  # [n, O]
        if self.bins is None:
            v = out[:, 0].numpy()
            if self.residual is not None:  # V = r + U, r in the model's units
                r = self.residual.raw([self.residual.prompt_text(prompt_ids[p.prompt]) for p in particles],
                                      [p.tokens for p in particles])
                v = v + np.asarray(self.residual.standardised(r))
            return v * self.scale + self.shift
        probs = torch.softmax(out, -1).numpy()
        return expected_max(probs, self.bins, remaining if stat == "max" else 1)

    def retain(self, particles: Sequence[Particle]) -> None:
        keep = {p.pid for p in particles}
        for pid in [q for q in self.slots if q not in keep]:
            self.rt.release(self.slots.pop(pid))

    def close(self) -> None:
        self.retain([])


@dataclass
class SearchScorer:
    """The Scorer of one search run (rules.Scorer): the knobs' weighted scorers over the run's
    prompts, and the reward for finished and final answers."""

    knobs: SearchKnobs
    prompt_texts: Sequence[str]
    prompt_ids: Sequence[Sequence[int]]
    tokenizer: Any
    values: Mapping[str, ValueModelScorer] = field(default_factory=dict)
    reward_fn: Any = None
    stats: ScorerStats = field(default_factory=ScorerStats)

    def __post_init__(self) -> None:
        missing = [s for s in self.knobs.value_models if s not in self.values]
        if missing:
            raise ValueError(f"no value model loaded for scorer(s) {missing}")
        if self.knobs.uses_reward and self.reward_fn is None:
            raise ValueError("this search needs a reward and none was given")

    @property
    def has_reward(self) -> bool:
        return self.reward_fn is not None

    def texts(self, particles: Sequence[Particle]) -> list[str]:
        return [self.tokenizer.decode(p.tokens, skip_special_tokens=True) for p in particles]

    async def reward(self, particles: Sequence[Particle]) -> np.ndarray:
        if not particles:
            return np.zeros(0)
        self.stats.reward_calls += len(particles)
        return np.asarray(self.reward_fn.score([self.prompt_texts[p.prompt] for p in particles],
                                               self.texts(particles)), dtype=np.float64)

    async def score(self, particles: Sequence[Particle], remaining: int) -> np.ndarray:
        total = np.zeros(len(particles))
        for name, w in zip(self.knobs.scorers, self.knobs.weights):
            if name == REWARD_SCORER:
                s = await self.reward(particles)
            else:
                vm = self.values[name]
                s = vm.values(self.prompt_ids, particles, self.knobs.value_stat, remaining)
                self.stats.value_tokens += vm.extended
            total += w * s
        return total

    def retain(self, particles: Sequence[Particle]) -> None:
        for vm in self.values.values():
            vm.retain(particles)

    def close(self) -> None:
        for vm in self.values.values():
            vm.close()
        self.stats.forks = sum(vm.rt.stats.get("forks", 0) for vm in self.values.values())


def slots_per_prompt(knobs: SearchKnobs) -> int:
    """Cache slots one prompt holds at most: the kept particle(s) and their children."""
    if knobs.rule == "smc":
        return 2 * knobs.particles
    return 1 + max(b.k for b in knobs.blocks)

