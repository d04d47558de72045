"""The search engine shared by every front-end: value models, reward, tokenizer, slot budget.

    engine = SearchEngine(tokenizer, value_models={"positive": PATH}, reward="vader_positive")
    knobs = engine.parse({"search_k": 8, "search_blocks": 2}, max_tokens=40)
    outs, stats = await engine.run(generator, texts, ids, knobs, seed=0)

A front-end supplies the Generator (offline: vllm.LLM; remote: an OpenAI-compatible server) and
the prompts (texts and token ids). Value models are loaded once, each with a slot cache of
`max_slots` slots: a run takes its prompts in waves of max_slots // slots_per_prompt(knobs)
prompts, and concurrent runs (the server) wait for free slots. Every value model is checked
against the tokenizer at start-up (vocabulary, tokenizer fingerprint), as the plugin does.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vas_vllm.search.knobs import SearchKnobError, SearchKnobs, parse_search_knobs
from vas_vllm.search.rules import Generator, SearchResult, derive_seed, run_search
from vas_vllm.search.scorers import (
    SearchScorer, ValueModelScorer, accepts_partial_text, slots_per_prompt,
)

logger = logging.getLogger("vas_vllm.search")


@dataclass
class SearchOutput:
    """One searched answer."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (EOS / a stop token) or "length"
    score: float                  # what made the final decision
    reward: float | None          # the true reward, when the search computed it
    kl_bound: float               # nats (rules.py: sum of log K - (K-1)/K, or log N per event)
    decisions: int
    gen_tokens: int               # generated for this prompt, discarded ones included


@dataclass
class SearchStats:
    """Cost of a run (all prompts)."""

    prompts: int = 0
    gen_tokens: int = 0           # generated, discarded ones included
    prompt_tokens: int = 0        # prompt tokens of every extend request, once per sample: vLLM
                                  # prefills each of a request's n samples as a request of its own
    cached_tokens: int = 0        # of those, served from the generator's prefix cache
    cached_known: bool = True     # False: the generator did not report cache hits
    cached_exact: bool = True     # False: estimated from the hits vLLM reports per request (one
                                  # sample's, counted n times; a sibling admitted in the same step
                                  # as the first sample of an uncached prompt hits blocks that
                                  # sample misses, so hits may be over-counted there). Exact: the
                                  # offline front-end over an engine with stats on reads its counters
    requests: int = 0             # extend requests (a request draws n continuations)
    value_tokens: int = 0         # tokens through value models
    reward_calls: int = 0         # texts scored by the reward
    seconds: float = 0.0
    kl_bound: float = 0.0         # mean over prompts

    @property
    def recomputed_tokens(self) -> int:
        """Prompt tokens the generator computed again (not served from its prefix cache)."""
        return self.prompt_tokens - self.cached_tokens

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["recomputed_tokens"] = self.recomputed_tokens
        return d


class SearchEngine:
    def __init__(
        self, tokenizer: Any, *, value_models: Mapping[str, str | Path] | None = None,
        reward: str | Any | None = None, default_model: str | None = None, max_slots: int = 128,
        max_len: int = 2048, device: str = "cpu", dtype: torch.dtype = torch.float32,
        generator_vocab_size: int | None = None,
    ) -> None:
        """tokenizer: the generator's (HF) tokenizer; value_models: name -> folder or hub id;
        reward: a spec (value_models.reward_specs) or an object with score(prompts, responses);
        max_slots: value-model cache slots per model; max_len: longest prompt + answer."""
        from value_models.checkpoint import resolve_model_path
        from value_models.compat import check_compatible

        from vas_vllm.runtime import ValueRuntime

        self.tokenizer = tokenizer
        self.value_paths = {k: str(v) for k, v in (value_models or {}).items()}
        if default_model is not None and default_model not in self.value_paths:
            raise ValueError(f"default_model {default_model!r} is not among the value models "
                             f"{sorted(self.value_paths)}")
        self.default_model = default_model or next(iter(self.value_paths), None)
        if isinstance(reward, str):
            from value_models.reward_specs import parse_reward

            reward = parse_reward(reward)
        self.reward = reward
        self.reward_name = getattr(reward, "name", None) if reward is not None else None
        self.max_slots, self.max_len = max_slots, max_len
        vocab = generator_vocab_size or len(tokenizer)
        self.runtimes: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}
        self.residual: dict[str, Any] = {}
        for name, where in self.value_paths.items():
            path = resolve_model_path(where)
            self.metadata[name] = check_compatible(path, tokenizer, generator_vocab_size=vocab)
            self.runtimes[name] = ValueRuntime.from_pretrained(
                path, max_slots=max_slots, max_len=max_len, max_candidates=1, device=device, dtype=dtype)
            if getattr(self.metadata[name], "residual", False):
                from vas_vllm.residual import ResidualReward

                self.residual[name] = ResidualReward(name, self.metadata[name], tokenizer)
            self._scorer(name)  # refuses models a search cannot use, now
        self._free_slots = max_slots
        self._cond: tuple[Any, asyncio.Condition] | None = None   # (its event loop, condition)

    def parse(self, args: Mapping[str, Any] | None, max_tokens: int) -> SearchKnobs:
        """The request's search (its defaults when it sets no search_* knob); SearchKnobError
        names a bad knob."""
        knobs = parse_search_knobs(
            dict(args or {}) or {"search_rule": "best_of_k"}, max_tokens=max_tokens,
            value_models=self.value_paths, default_model=self.default_model,
            reward=self.reward_name, reward_partial=accepts_partial_text(self.reward),
            distributional={k: getattr(m, "value_head", "scalar") == "distributional"
                            for k, m in self.metadata.items()})
        assert knobs is not None
        need = slots_per_prompt(knobs)
        if knobs.value_models and need > self.max_slots:
            what = "search_k" if knobs.rule == "best_of_k" else "search_k (particles)"
            raise SearchKnobError(f"{what} needs {need} value-model cache slots per prompt, this "
                                  f"search engine has {self.max_slots} (raise max_slots)")
        return knobs

    async def run(self, generator: Generator, texts: Sequence[str], ids: Sequence[Sequence[int]],
                  knobs: SearchKnobs, seed: int = 0, stats: SearchStats | None = None,
                  progress: Any = None) -> tuple[list[SearchOutput], SearchStats]:
        """Search every prompt (texts[i], ids[i]); prompt i's seed is derived from (seed, i).
        `progress`: called with the number of prompts finished, after each wave."""
        stats = stats or SearchStats()
        too_long = [i for i, p in enumerate(ids) if len(p) + knobs.max_tokens > self.max_len]
        if too_long:
            raise SearchKnobError(
                f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens: with max_tokens "
                f"{knobs.max_tokens} it exceeds the search's max_len {self.max_len}")
        t0 = time.perf_counter()
        per = slots_per_prompt(knobs) if knobs.value_models else 0
        wave = max(1, self.max_slots // per) if per else len(ids)
        outs: list[SearchOutput] = []
        for start in range(0, len(ids), wave):
            idx = list(range(start, min(start + wave, len(ids))))
            await self._acquire(per * len(idx))
            scorer = SearchScorer(
                knobs, [texts[i] for i in idx], [ids[i] for i in idx], self.tokenizer,
                {name: self._scorer(name) for name in knobs.value_models}, self.reward)
            try:
                results = await run_search(generator, scorer, knobs, [ids[i] for i in idx],
                                           [derive_seed(seed, i) for i in idx])
            finally:
                scorer.close()
                await self._release(per * len(idx))
            stats.value_tokens += scorer.stats.value_tokens
            stats.reward_calls += scorer.stats.reward_calls
            outs += [self._output(i, r) for i, r in zip(idx, results)]
            if progress is not None:
                progress(len(idx))
        stats.prompts += len(ids)
        stats.gen_tokens += sum(o.gen_tokens for o in outs)
        stats.seconds += time.perf_counter() - t0
        stats.kl_bound = sum(o.kl_bound for o in outs) / max(len(outs), 1)
        return outs, stats

    def _scorer(self, name: str) -> ValueModelScorer:
        return ValueModelScorer(name, self.runtimes[name], self.metadata[name], self.residual.get(name))

    def _output(self, index: int, r: SearchResult) -> SearchOutput:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        return SearchOutput(index, text, list(r.tokens), "stop" if r.finished else "length", r.score,
                            r.reward, r.kl_bound, r.decisions, r.gen_tokens)

    def _condition(self) -> asyncio.Condition:
        """The slot condition of the running event loop (the blocking front-ends run each call
        in a new loop; an asyncio primitive belongs to one loop)."""
        loop = asyncio.get_running_loop()
        if self._cond is None or self._cond[0] is not loop:
            self._cond = (loop, asyncio.Condition())
        return self._cond[1]

    async def _acquire(self, n: int) -> None:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self._free_slots >= n)
            self._free_slots -= n

    async def _release(self, n: int) -> None:
        cond = self._condition()
        async with cond:
            self._free_slots += n
            cond.notify_all()


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def run_blocking(coro: Any) -> Any:
    """asyncio.run, with a clear error where an event loop is already running."""
    if _in_loop():
        coro.close()
        raise RuntimeError("this call blocks, and an event loop is running here: await the "
                           "async variant instead")
    return asyncio.run(coro)


__all__ = ["SearchEngine", "SearchOutput", "SearchStats", "run_blocking"]
