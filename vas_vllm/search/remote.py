"""Guided search over any OpenAI-compatible completions server (the remote VAS client's HTTP).

    searcher = RemoteSearcher("http://127.0.0.1:8000", "smollm2", tokenizer=GEN_OR_VALUE_FOLDER,
                              value_models={"positive": PATH}, reward="vader_positive")
    outs = searcher.generate(["My day was"], max_tokens=40, search_k=8, search_blocks=2)

Per block, one completions request per particle: the prompt as token ids, `n = K`, `max_tokens =
M`, the particle's seed, the request's temperature and neutral sampling settings (top_p 1, top_k
0, ...: a server's generation-config defaults cannot change pi_ref), `logprobs = 0` with
`return_tokens_as_token_ids` so the continuations come back as exact token ids (a vLLM extension;
a server that ignores it is refused with a clear error). Requests run concurrently. Cached prompt
tokens are read from `usage.prompt_tokens_details.cached_tokens` (vLLM: `--enable-prompt-tokens-
details`); without it the run says the figure is unknown. Start-up checks (served model, vocabulary,
tokenizer) are remote VAS's (remote/probe.py).
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vas_vllm.remote import probe
from vas_vllm.remote.api import NEUTRAL, CompletionsAPI, RemoteVASError, _token_id
from vas_vllm.search.engine import SearchEngine, SearchOutput, SearchStats, run_blocking
from vas_vllm.search.rules import Continuation


def parse_choices(body: dict[str, Any], n: int) -> tuple[list[Continuation], int | None]:
    """The n continuations of a completions response (token ids from logprobs), and the cached
    prompt tokens it reports (None when it does not)."""
    try:
        choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
    except (KeyError, TypeError, AttributeError):
        raise RemoteVASError(f"unexpected completions response (no choices): {str(body)[:300]}") from None
    if len(choices) != n:
        raise RemoteVASError(f"asked for n={n} continuations, the server returned {len(choices)}")
    out = []
    for c in choices:
        lp = c.get("logprobs") or {}
        tokens = lp.get("tokens")
        if tokens is None:
            raise RemoteVASError("the server returned no logprobs tokens (choices[].logprobs.tokens): "
                                 "search needs the generated token ids (logprobs=0 with "
                                 "return_tokens_as_token_ids, a vLLM extension)")
        out.append(Continuation([_token_id(t, "the token") for t in tokens], c.get("finish_reason") == "stop"))
    details = (body.get("usage") or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return out, (int(cached) if cached is not None else None)


class RemoteGenerator:
    """rules.Generator over a CompletionsAPI."""

    def __init__(self, api: CompletionsAPI, stats: SearchStats, *, temperature: float = 1.0,
                 stop_token_ids: Sequence[int] | None = None, concurrency: int = 32) -> None:
        self.api, self.stats, self.temperature = api, stats, temperature
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids else None
        self._sem = asyncio.Semaphore(concurrency)

    async def _one(self, prefix: Sequence[int], k: int, m: int, seed: int) -> list[Continuation]:
        fields: dict[str, Any] = dict(NEUTRAL, n=k, max_tokens=m, seed=seed, temperature=self.temperature,
                                      logprobs=0, return_tokens_as_token_ids=True)
        if self.stop_token_ids:
            fields["stop_token_ids"] = self.stop_token_ids
        async with self._sem:
            body = await self.api.call("POST", "/v1/completions",
                                       {"model": self.api.model, "prompt": list(prefix), **fields},
                                       what="search extend request")
        assert body is not None
        conts, cached = parse_choices(body, k)
        self.stats.requests += 1
        self.stats.prompt_tokens += k * len(prefix)      # each of the n samples is prefilled
        self.stats.cached_exact = False                  # SearchStats.cached_exact
        if cached is None:
            self.stats.cached_known = False
        else:
            self.stats.cached_tokens += k * cached       # vLLM reports one sample's hits
        return conts

    async def extend(self, prefixes: Sequence[Sequence[int]], k: int, m: int,
                     seeds: Sequence[int]) -> list[list[Continuation]]:
        return list(await asyncio.gather(*[self._one(p, k, m, s) for p, s in zip(prefixes, seeds)]))


class AsyncRemoteSearcher:
    """Guided search against a completions server (see the module doc); `options` go to
    SearchEngine (max_slots, max_len, default_model, device, dtype)."""

    def __init__(self, base_url: str, model: str, *, tokenizer: str | Path | None = None,
                 value_models: Mapping[str, str | Path] | None = None, reward: str | Any | None = None,
                 api_key: str | None = None, timeout_s: float = 120.0, max_retries: int = 5,
                 concurrency: int = 32, check_tokenizer: bool = True, **options: Any) -> None:
        from transformers import AutoTokenizer

        source = tokenizer or next(iter((value_models or {}).values()), None)
        if source is None:
            raise ValueError("RemoteSearcher needs the generator's tokenizer: pass tokenizer= (a "
                             "folder or hub id), or a value model (whose folder carries it)")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.engine = SearchEngine(self.tokenizer, value_models=value_models, reward=reward, **options)
        self.api_args = dict(base_url=base_url, model=model, api_key=api_key, timeout_s=timeout_s,
                             max_retries=max_retries, max_connections=concurrency)
        self.concurrency, self.check_tokenizer = concurrency, check_tokenizer
        self.checked = False
        self.last_stats = SearchStats()

    async def _check(self, api: CompletionsAPI) -> None:
        if self.checked:
            return
        max_len = await probe.served_model(api)
        if max_len is not None and max_len < self.engine.max_len:
            self.engine.max_len = max_len
        vocab = await probe.vocab_size(api, len(self.tokenizer))
        if vocab is not None and any(m.generator_vocab_size != vocab for m in self.engine.metadata.values()):
            raise probe.IncompatibleServerError(
                f"vocabulary size mismatch: {api.model!r} at {api.base_url} has vocab_size={vocab}, the "
                f"value models were made for {sorted({m.generator_vocab_size for m in self.engine.metadata.values()})}")
        if self.check_tokenizer:
            await probe.check_tokenizer(api, self.tokenizer, "the search's tokenizer")
        self.checked = True

    async def generate(self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 32,
                       temperature: float = 1.0, *, seed: int = 0,
                       stop_token_ids: Sequence[int] | None = None, progress: Any = None,
                       **knobs: Any) -> list[SearchOutput]:
        """Searched answers of `prompts` (texts or token ids), in order; `knobs` are the
        search_* knobs. The run's cost: `last_stats`."""
        outs, self.last_stats = await self.search(prompts, max_tokens, temperature, seed=seed,
                                                  stop_token_ids=stop_token_ids, progress=progress, **knobs)
        return outs

    async def search(self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 32,
                     temperature: float = 1.0, *, seed: int = 0,
                     stop_token_ids: Sequence[int] | None = None, progress: Any = None,
                     **knobs: Any) -> tuple[list[SearchOutput], SearchStats]:
        """generate, returning this call's stats (safe when calls run concurrently)."""
        parsed = self.engine.parse(knobs, max_tokens)      # bad knobs: refused before any request
        if not temperature > 0.0:
            raise ValueError(f"search samples continuations: temperature must be > 0, found {temperature}")
        texts, ids = [], []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                ids.append(list(self.tokenizer(p)["input_ids"]))
            else:
                ids.append([int(t) for t in p])
                texts.append(self.tokenizer.decode(ids[-1], skip_special_tokens=True))
        stats = SearchStats()
        async with CompletionsAPI(**self.api_args) as api:
            await self._check(api)
            gen = RemoteGenerator(api, stats, temperature=temperature, stop_token_ids=stop_token_ids,
                                  concurrency=self.concurrency)
            outs, _ = await self.engine.run(gen, texts, ids, parsed, seed, stats, progress)
        return outs, stats


class RemoteSearcher:
    """Blocking twin of AsyncRemoteSearcher (same arguments)."""

    def __init__(self, base_url: str, model: str, **options: Any) -> None:
        self.inner = AsyncRemoteSearcher(base_url, model, **options)

    @property
    def last_stats(self) -> SearchStats:
        return self.inner.last_stats

    def generate(self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 32,
                 temperature: float = 1.0, **kwargs: Any) -> list[SearchOutput]:
        return run_blocking(self.inner.generate(prompts, max_tokens, temperature, **kwargs))
