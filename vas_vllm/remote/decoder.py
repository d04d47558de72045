"""Remote VAS: steer a generator you can only call, over an OpenAI-compatible completions API.

    vas = RemoteVAS("http://127.0.0.1:8000", "smollm2", value_models={"positive": PATH})
    outs = vas.generate(["My day was"], max_tokens=32, temperature=1.0, vas_beta=8, vas_top_k=20)

Per step (stepper.py): one completions request for the top-k next tokens of every prompt in
flight, with their log-probabilities (api.py; or one request per prompt); one forward per value
model over every prompt's k candidates (the plugin's ValueRuntime with its slot cache and
commit-on-accept, through VASCore.score_model); the plugin's shifts (reweight.combine); a draw
from exactly the distribution the plugin samples (steps.py), which takes a second request when it
falls outside the top-k. Prompts run in lockstep, up to `concurrency` at a time; finished texts go
to `out` as they finish (results.py), and a rerun with the same file resumes. Start-up checks:
probe.py.

Temperature (what is exact): greedy and T = 1 always; any T on a server whose log-probabilities
are taken after temperature (vLLM `--logprobs-mode processed_logprobs`, detected at start). On a
server with vLLM's default raw log-probabilities at another T, the rest's mass at T is unknown:
the mean rule is then sampled exactly by the two-coin sampler (more draws), vas_mask_outside_top_k
needs no mass, and the exact rules (vas_tilt, vas_bon_n on a distributional model,
vas_threshold) are refused.

Shape key: B prompts in a step, K candidates.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vas_vllm.config import VASConfig
from vas_vllm.core import GREEDY_EPS, VASCore, VASRequest
from vas_vllm.knobs import RequestKnobs, parse_knobs
from vas_vllm.remote import probe
from vas_vllm.remote.api import CompletionsAPI
from vas_vllm.remote.results import ResultStore
from vas_vllm.remote.stepper import Plan, Prompt, RemoteStats, Row, StepTable, Stepper, gather

logger = logging.getLogger("vas_vllm.remote")
__all__ = ["AsyncRemoteVAS", "RemoteCompletion", "RemoteStats", "RemoteVAS", "StepTable"]


@dataclass
class RemoteCompletion:
    index: int
    prompt: Prompt
    text: str
    token_ids: list[int]
    finish_reason: str           # "stop" (a stop token) or "length"
    requests: float              # HTTP requests for this prompt (a batched step request counts 1/B)
    steps: list[StepTable] | None = None   # with trace=True


class AsyncRemoteVAS:
    """Remote VAS as coroutines (see the module doc); `RemoteVAS` is the blocking twin."""

    def __init__(
        self, base_url: str, model: str, value_models: Mapping[str, str | Path], *,
        api_key: str | None = None, tokenizer: str | Path | None = None, concurrency: int = 8,
        timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 0.5, max_draws: int = 64,
        check_tokenizer: bool = True, max_len: int = 4096, progress: bool = True,
        batch_requests: bool = True, **vas_options: Any,
    ) -> None:
        """`vas_options` are VASConfig fields (default_model, default_beta, default_top_k,
        max_top_k, dtype, device): the engine configuration of the plugin, validated the same way.
        `batch_requests`: one top-k request per step for all prompts in flight (a list of
        prompts); False: one per prompt, seeded, whose own sample then often spares the draw
        from the rest of the vocabulary."""
        from transformers import AutoTokenizer

        from value_models.compat import load_value_model_metadata

        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, found {concurrency}")
        self.cfg = VASConfig(value_models={k: str(v) for k, v in value_models.items()},
                             **{"max_concurrent": concurrency, **vas_options})
        self.metadata = {n: load_value_model_metadata(p) for n, p in self.cfg.value_models.items()}
        tok_path = tokenizer or self.cfg.value_models[self.cfg.default_model_name]
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        self.api_args = dict(base_url=base_url, model=model, api_key=api_key, timeout_s=timeout_s,
                             max_retries=max_retries, backoff_s=backoff_s, max_connections=2 * concurrency)
        self.concurrency, self.max_draws, self.max_len = concurrency, max_draws, max_len
        self.check_tokenizer, self.progress, self.batch_requests = check_tokenizer, progress, batch_requests
        self.core: VASCore | None = None
        self.facts: probe.ServerFacts | None = None
        self.last_stats = RemoteStats()

    # ---- start-up ----------------------------------------------------------------------------
    def parse(self, knobs: Mapping[str, Any]) -> RequestKnobs:
        """The plugin's knob validation (same messages); no vas_* knob means the defaults."""
        bad = [k for k in knobs if not k.startswith("vas_")]
        if bad:
            raise TypeError(f"unexpected argument(s) {bad}: VAS knobs start with 'vas_'")
        args = dict(knobs) or {"vas_model": self.cfg.default_model_name}
        parsed = parse_knobs(args, self.cfg, self.metadata.__getitem__)
        assert parsed is not None
        return parsed

    async def _facts(self, api: CompletionsAPI) -> probe.ServerFacts:
        if self.facts is None:
            sizes = {n: m.generator_vocab_size for n, m in self.metadata.items()}
            if len(set(sizes.values())) > 1:
                raise probe.IncompatibleServerError(
                    f"the value models were made for different vocabularies: {sizes}")
            expected = next(iter(sizes.values()))
            max_model_len = await probe.served_model(api)
            vocab = await probe.vocab_size(api, expected)
            if vocab is not None and vocab != expected:
                raise probe.IncompatibleServerError(
                    f"vocabulary size mismatch: {api.model!r} at {api.base_url} has vocab_size={vocab}, "
                    f"the value models ({', '.join(sizes)}) were made for vocab_size={expected}")
            if vocab is None:
                logger.warning("%s does not validate logit_bias ids: its vocabulary size is unchecked",
                               api.base_url)
            has_tokenize = True
            if self.check_tokenizer:
                has_tokenize = await probe.check_tokenizer(
                    api, self.tokenizer, f"value model {self.cfg.default_model_name!r}'s tokenizer")
            self.facts = probe.ServerFacts(vocab, max_model_len, has_tokenize)
        return self.facts

    def _load_value_models(self) -> VASCore:
        """The plugin's core (value models with their slot caches), once the server checked out."""
        if self.core is None:
            assert self.facts is not None
            max_len = min(self.max_len, self.facts.max_model_len or self.max_len)
            self.core = VASCore(
                self.cfg, device=torch.device("cpu"),
                generator_vocab_size=self.facts.vocab_size or len(self.tokenizer),
                generator_tokenizer=self.tokenizer, max_num_seqs=self.concurrency,
                max_model_len=max_len, generator_dtype=torch.float32)
        return self.core

    async def _plan(self, api: CompletionsAPI, knobs: RequestKnobs, temperature: float) -> Plan:
        probe_ids = self.tokenizer(probe.PROBE_TEXT, add_special_tokens=False)["input_ids"][:16]
        greedy = temperature < GREEDY_EPS
        wants_next = greedy and knobs.any_exact and not knobs.mask_outside_top_k
        n = knobs.top_k + 1 if wants_next else knobs.top_k
        what = (f"vas_top_k={knobs.top_k} (greedy with an exact rule: k + 1 to see the best token "
                "outside the top-k)") if wants_next else f"vas_top_k={knobs.top_k}"
        await probe.check_logprobs(api, probe_ids, n, what)
        if greedy:
            return Plan(knobs, 0.0, n, "greedy")
        if temperature == 1.0:
            return Plan(knobs, temperature, n, "table")
        kind = await probe.logprobs_kind(api, probe_ids, n, temperature)
        if kind == "processed":
            return Plan(knobs, temperature, n, "table")
        if knobs.mask_outside_top_k:  # the rest gets nothing: ratios inside the top-k suffice
            return Plan(knobs, temperature, n, "table", lp_scale=temperature)
        if knobs.any_exact:
            raise probe.IncompatibleServerError(
                f"exact rule ({knobs.mode}) at temperature {temperature}: the server returns "
                "log-probabilities before temperature (vLLM's default raw_logprobs), so the rest of "
                "the vocabulary's mass at this temperature, which the rule needs, is unknown. Use "
                "temperature 1 (or greedy), or a server started with --logprobs-mode processed_logprobs")
        logger.info("raw log-probabilities at temperature %g: the mean rule is sampled by the "
                    "two-coin sampler (about (G + 1) / (mG + 1 - m) server draws per token)", temperature)
        return Plan(knobs, temperature, n, "two_coin", lp_scale=temperature)

    # ---- the run ---------------------------------------------------------------------------
    async def generate(
        self, prompts: Sequence[Prompt], max_tokens: int = 16, temperature: float = 1.0, *,
        seed: int = 0, out: str | Path | None = None, ignore_eos: bool = False,
        stop_token_ids: Sequence[int] | None = None, trace: bool = False, **knobs: Any,
    ) -> list[RemoteCompletion]:
        """Steered completions of `prompts` (texts or token-id lists), in prompt order. `knobs`
        are the plugin's per-request knobs (vas_beta=..., vas_top_k=...). With `out`, finished
        texts are appended to that JSONL file as they finish, and prompts already there are not
        generated again."""
        return await self._run(list(prompts), max_tokens, temperature, seed, out, ignore_eos,
                               stop_token_ids, trace, None, knobs)

    async def tables(self, prompt: Prompt, tokens: Sequence[int], temperature: float = 1.0,
                     **knobs: Any) -> list[StepTable]:
        """The steered distribution at every step of a given continuation (teacher forcing):
        one table over the top-k and the rest per token, and no sampling."""
        if not tokens:
            return []
        res = await self._run([prompt], len(tokens), temperature, 0, None, True, None, True,
                              [list(tokens)], knobs)
        assert res[0].steps is not None
        return res[0].steps

    async def _run(self, prompts: list[Prompt], max_tokens: int, temperature: float, seed: int,
                   out: str | Path | None, ignore_eos: bool, stop_token_ids: Sequence[int] | None,
                   trace: bool, forced: list[list[int]] | None, raw_knobs: Mapping[str, Any]
                   ) -> list[RemoteCompletion]:
        knobs = self.parse(raw_knobs)           # bad knobs: refused before any request
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, found {max_tokens}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, found {temperature}")
        stops = set(stop_token_ids if stop_token_ids is not None else [self.tokenizer.eos_token_id])
        stops.discard(None)
        store = None
        if out is not None:
            store = ResultStore(out, {
                "model": self.api_args["model"], "value_models": dict(self.cfg.value_models),
                "knobs": dict(raw_knobs), "max_tokens": max_tokens, "temperature": temperature,
                "ignore_eos": ignore_eos, "stop_token_ids": sorted(stops)})
        done = store.load(prompts) if store else {}
        results: dict[int, RemoteCompletion] = {
            i: RemoteCompletion(i, r["prompt"], r["text"], r["token_ids"], r["finish_reason"], r["requests"])
            for i, r in done.items()}
        stats = self.last_stats = RemoteStats()
        t0 = time.perf_counter()
        async with CompletionsAPI(**self.api_args) as api:
            try:
                await self._facts(api)
                plan = await self._plan(api, knobs, temperature)
                self._load_value_models()
                if store:
                    store.start()
                todo = [i for i in range(len(prompts)) if i not in results]
                await self._loop(api, plan, prompts, todo, max_tokens, seed, stops, ignore_eos,
                                 trace, forced, store, results, stats)
            finally:
                stats.requests = api.requests
                stats.seconds = time.perf_counter() - t0
        return [results[i] for i in range(len(prompts))]

    async def _tokenize(self, api: CompletionsAPI, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            vocab = self.facts.vocab_size if self.facts else None
            if not ids or min(ids) < 0 or (vocab is not None and max(ids) >= vocab):
                raise ValueError(f"a token-id prompt must be non-empty ids in [0, {vocab}), found {ids[:8]}...")
            return ids
        if self.facts is not None and self.facts.has_tokenize:
            ids = await api.tokenize(prompt, add_special_tokens=True)
            if ids is not None:
                return ids
        return list(self.tokenizer(prompt)["input_ids"])

    async def _loop(self, api: CompletionsAPI, plan: Plan, prompts: list[Prompt], todo: list[int],
                    max_tokens: int, seed: int, stops: set[int], ignore_eos: bool, trace: bool,
                    forced: list[list[int]] | None, store: ResultStore | None,
                    results: dict[int, RemoteCompletion], stats: RemoteStats) -> None:
        from tqdm import tqdm

        assert self.core is not None
        core = self.core
        scale = plan.temperature if plan.mode != "greedy" else 1.0
        queue = list(reversed(todo))
        active: list[Row] = []
        stepper = Stepper(api, core, plan, seed, stats, batch_requests=self.batch_requests,
                          max_draws=self.max_draws, max_model_len=self.facts.max_model_len if self.facts else None)
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt",
                   desc="remote VAS", disable=not self.progress, dynamic_ncols=True)
        try:
            while queue or active:
                new = [queue.pop() for _ in range(min(len(queue), self.concurrency - len(active)))]
                for i, ids in zip(new, await gather([self._tokenize(api, prompts[i]) for i in new])):
                    req = VASRequest(plan.knobs, scale=scale)
                    for name in plan.knobs.models:
                        req.slots[name] = core.runtimes[name].allocate()
                    active.append(Row(i, prompts[i], ids, len(ids), req, np.random.default_rng([seed, i]),
                                      forced[i] if forced else None, steps=[] if trace else None))
                tokens = await stepper.step(active)
                still: list[Row] = []
                for row, token in zip(active, tokens):
                    row.ids.append(token)
                    stats.tokens += 1
                    n_out = len(row.ids) - row.prompt_len
                    limit = len(row.forced) if row.forced is not None else max_tokens
                    if (token in stops and not ignore_eos) or n_out >= limit:
                        self._finish(row, "stop" if token in stops and not ignore_eos else "length",
                                     store, results, stats)
                        bar.update(1)
                    else:
                        still.append(row)
                active = still
                bar.set_postfix(tok_s=f"{stats.tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}",
                                req_tok=f"{api.requests / max(stats.tokens, 1):.2f}", refresh=False)
        finally:
            bar.close()
            for row in active:
                core.release(row.req)

    def _finish(self, row: Row, reason: str, store: ResultStore | None,
                results: dict[int, RemoteCompletion], stats: RemoteStats) -> None:
        assert self.core is not None
        self.core.release(row.req)
        text = self.tokenizer.decode(row.out, skip_special_tokens=True)
        done = RemoteCompletion(row.index, row.prompt, text, list(row.out), reason, row.requests, row.steps)
        if store:
            store.write({"index": row.index, "prompt": row.prompt, "text": text,
                         "token_ids": done.token_ids, "finish_reason": reason, "requests": row.requests})
        results[row.index] = done
        stats.prompts += 1


class RemoteVAS:
    """Blocking remote VAS: the same constructor and methods as AsyncRemoteVAS, run with
    asyncio.run (from code that already runs an event loop, use AsyncRemoteVAS)."""

    def __init__(self, base_url: str, model: str, value_models: Mapping[str, str | Path], **options: Any) -> None:
        self.inner = AsyncRemoteVAS(base_url, model, value_models, **options)

    @property
    def last_stats(self) -> RemoteStats:
        return self.inner.last_stats

    def generate(self, prompts: Sequence[Prompt], max_tokens: int = 16, temperature: float = 1.0,
                 **kwargs: Any) -> list[RemoteCompletion]:
        """AsyncRemoteVAS.generate, blocking."""
        return _blocking(self.inner.generate(prompts, max_tokens, temperature, **kwargs))

    def tables(self, prompt: Prompt, tokens: Sequence[int], temperature: float = 1.0,
               **knobs: Any) -> list[StepTable]:
        """AsyncRemoteVAS.tables, blocking."""
        return _blocking(self.inner.tables(prompt, tokens, temperature, **knobs))


def _blocking(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("RemoteVAS blocks, and an event loop is running here: use AsyncRemoteVAS "
                       "(await vas.generate(...)) instead")
