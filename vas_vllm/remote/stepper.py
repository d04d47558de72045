"""One decoding step of remote VAS for every prompt in flight: the top-k requests, one value
forward per model (VASCore.score_model: the plugin's ValueRuntime with its slot cache and
commit-on-accept), the plugin's shifts (reweight.combine), and a token per prompt drawn from
exactly the plugin's distribution (steps.py), with a draw from the server when the rest of the
vocabulary is picked (or the two-coin sampler needs one).

Shape key: B prompts in a step, K candidates.
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vas_vllm.core import VASCore, VASRequest
from vas_vllm.knobs import RequestKnobs
from vas_vllm.remote import steps
from vas_vllm.remote.api import CompletionsAPI, RemoteRequestError, RemoteVASError, TopK
from vas_vllm.reweight import combine

Prompt = str | list[int]


@dataclass
class StepTable:
    """One step: the top-k ids, log p over them and the rest (K + 1 entries, at T = 1 for greedy
    steps; None where the rest's mass is unknown, i.e. two-coin steps) and the token taken."""

    cand: list[int]
    log_p: list[float] | None
    token: int


@dataclass
class RemoteStats:
    prompts: int = 0
    tokens: int = 0
    requests: int = 0            # every HTTP request of the run (probes and retries included)
    step_requests: int = 0       # top-k requests: one per step (batched) or per token
    draws: int = 0               # further draws (outside the top-k, two-coin coins)
    seconds: float = 0.0

    @property
    def requests_per_token(self) -> float:
        return self.requests / max(self.tokens, 1)


@dataclass
class Row:
    """A prompt in flight."""

    index: int
    prompt: Prompt
    ids: list[int]               # prompt token ids, then the generated ones
    prompt_len: int
    req: VASRequest
    rng: np.random.Generator
    forced: list[int] | None = None
    requests: float = 0.0
    steps: list[StepTable] | None = None

    @property
    def out(self) -> list[int]:
        return self.ids[self.prompt_len:]


@dataclass
class Plan:
    """How this run's steps are taken (decided once, at start)."""

    knobs: RequestKnobs
    temperature: float           # the request's T (0 for greedy)
    n_logprobs: int              # K, or K + 1 for greedy with an exact rule
    mode: str                    # "greedy" | "table" | "two_coin"
    lp_scale: float = 1.0        # log pi_T(a) = server logprob / lp_scale (+ const in two_coin)


def seed_of(*parts: int) -> int:
    """A server seed for one draw, from the run's seed, the prompt, the position, the attempt."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:7], "big")


async def gather(jobs: list[Any]) -> list[Any]:
    """Run jobs concurrently; after all settle, raise the first error (no job left running)."""
    out = await asyncio.gather(*jobs, return_exceptions=True)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


async def _done(token: int) -> int:
    return token


class Stepper:
    def __init__(self, api: CompletionsAPI, core: VASCore, plan: Plan, seed: int, stats: RemoteStats, *,
                 batch_requests: bool, max_draws: int, max_model_len: int | None) -> None:
        self.api, self.core, self.plan, self.seed, self.stats = api, core, plan, seed, stats
        self.batch_requests, self.max_draws, self.max_model_len = batch_requests, max_draws, max_model_len

    async def step(self, rows: list[Row]) -> list[int]:
        """One token for every row: top-k requests, one value forward per model, the draws."""
        plan = self.plan
        K, T = plan.knobs.top_k, plan.temperature
        tops, firsts = await self._top_k(rows)
        self.stats.step_requests += 1 if self.batch_requests else len(rows)
        cand = torch.tensor([t.ids[:K] for t in tops], dtype=torch.long)                  # [B, K]
        lp = torch.tensor([t.logprobs[:K] for t in tops], dtype=torch.float64) / plan.lp_scale  # [B, K]
        valid = steps.valid_candidates(lp * plan.lp_scale)                                 # [B, K]
        reqs = [r.req for r in rows]
        scores = {name: self.core.score_model(name, reqs, [r.ids for r in rows],
                                              [r.prompt_len for r in rows], cand)
                  for name in self.core.runtimes}
        exact = plan.knobs.any_exact
        scale_t = torch.full((len(rows),), T if plan.mode != "greedy" else 1.0, dtype=torch.float32)
        delta, rest, _ = combine([plan.knobs] * len(rows), valid, scores,
                                 lp if exact else None, scale_t if exact else None)       # [B, K], [B]
        mask = torch.full((len(rows),), plan.knobs.mask_outside_top_k)
        # [B, K + 1]: the distribution over the top-k and the rest (at T = 1 for greedy rows)
        table = steps.step_table(lp, valid, delta, rest, scale_t, mask) if plan.mode != "two_coin" else None
        if plan.mode == "greedy":
            nxt = torch.tensor([t.logprobs[K] if len(t.logprobs) > K else float("-inf") for t in tops],
                               dtype=torch.float64)                                        # [B]
            cols = steps.greedy_choice(lp, valid, delta, rest, nxt, mask).tolist()
        jobs = []
        for b, (row, top) in enumerate(zip(rows, tops)):
            ids = top.ids[:K]
            if row.forced is not None:
                jobs.append(_done(row.forced[len(row.out)]))
            elif plan.mode == "greedy":
                jobs.append(_done(ids[cols[b]] if cols[b] < K else top.ids[K]))
            elif table is not None:
                col = steps.sample_column(table[b].numpy(), row.rng.random())
                jobs.append(_done(ids[col]) if col < K else self._rest(row, ids, firsts[b]))
            else:
                shift = ((delta[b] - rest[b]).double() / T).numpy()
                jobs.append(self._two_coin(row, ids, lp[b].numpy(), shift, firsts[b]))
            if row.steps is not None:
                row.steps.append(StepTable(ids, table[b].tolist() if table is not None else None, -1))
        tokens = await gather(jobs)
        for row, token in zip(rows, tokens):
            if row.steps is not None:
                row.steps[-1].token = token
        return tokens

    def _label(self, row: Row) -> str:
        limit = self.max_model_len
        return (f"top-k request (prompt {row.index}, new token {len(row.out)}, {len(row.ids)} tokens so far"
                + (f", the server's max_model_len is {limit})" if limit else ")"))

    async def _top_k(self, rows: list[Row]) -> tuple[list[TopK], list[int | None]]:
        """Every row's top-k, and a server sample of pi_T per row where one comes free (one
        seeded request per row; a batched request's samples share one seed, so none is used)."""
        n, T, api = self.plan.n_logprobs, self.plan.temperature, self.api
        if not self.batch_requests:
            tops = await gather([api.top_k(r.ids, n, T, seed_of(self.seed, r.index, len(r.ids), 0),
                                           what=self._label(r)) for r in rows])
            for r in rows:
                r.requests += 1
            return tops, [t.sampled for t in tops]
        what = f"top-k request for prompts {[r.index for r in rows]} (new token {len(rows[0].out)})"
        try:
            tops = await api.top_k_many([r.ids for r in rows], n, T, what=what)
        except RemoteRequestError:
            if len(rows) > 1:  # name the prompt: ask each alone, the culprit's error is raised
                await gather([api.top_k(r.ids, n, T, 0, what=self._label(r)) for r in rows])
            raise
        for r in rows:
            r.requests += 1 / len(rows)
        return tops, [None] * len(rows)

    def _drawer(self, row: Row, exclude: list[int]) -> steps.Draw:
        async def draw(attempt: int) -> int:
            row.requests += 1
            self.stats.draws += 1
            return await self.api.draw(
                row.ids, self.plan.temperature, seed_of(self.seed, row.index, len(row.ids), attempt), exclude,
                what=f"draw request (prompt {row.index}, token {len(row.out)})")
        return draw

    async def _rest(self, row: Row, cand: list[int], first: int | None) -> int:
        try:
            token, _ = await steps.pick_rest(first, cand, self._drawer(row, cand), self.max_draws)
        except RuntimeError as e:
            raise RemoteVASError(f"prompt {row.index}, token {len(row.out)}: {e}") from None
        return token

    async def _two_coin(self, row: Row, cand: list[int], log_pi: np.ndarray, shift: np.ndarray,
                        first: int | None) -> int:
        try:
            token, _ = await steps.two_coin(row.rng, log_pi, shift, cand, first, self._drawer(row, []),
                                            self.max_draws)
        except RuntimeError as e:
            raise RemoteVASError(f"prompt {row.index}, token {len(row.out)}: {e}") from None
        return token
