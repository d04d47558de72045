"""Value-guided search at block boundaries: the rules, written over two operations.

    generator.extend(prefixes, k, m, seeds)   K continuations of M tokens for every particle
    scorer.score(particles, remaining)        an estimate of E[r(final) | particle] for each

(and, where a reward is configured, scorer.reward(particles): the true reward of a text). Why
selection and not token-level tilts: ../docs/search.md. The rules:

- **Blockwise best-of-K** (`best_of_k`, Mudgal et al. 2310.17022): for each block b, draw K_b
  continuations of M_b tokens from the generator for the prompt's particle and keep the one the
  scorer ranks first (the first such on ties). When the true reward is available it makes the last
  block's choice. With one block this is exactly Best-of-N. KL bound: each decision among K
  continuations by a continuous score spends at most log K - (K-1)/K nats, and by the chain rule
  the answer's KL from the generator is at most the sum over the decisions actually made.
- **Block SMC** (`smc`, twisted SMC 2404.17546): N particles, each extended by one continuation
  per block; particle i carries log w_i += (s_i(new) - s_i(old)) / tau, the score playing the
  twist log psi = s / tau (psi at the prompt is a constant and cancels). The last block's
  increment uses the true reward when there is one, (r - s_old) / tau: the final weight is the
  reward's tilt over the last twist, so value errors cost efficiency, not correctness. Resample
  (multinomially, weights reset) when ESS = (sum w)^2 / sum w^2 < ess * N. The answer is the
  argmax of the final weights, or a draw from them. KL bound: log N per resampling event, the
  final pick included (a resampled particle's density is at most N times its proposal's).
- **Finished particles** (EOS or a stop token before the block's end) are complete: they are
  scored by the reward when there is one (otherwise by the scorer) and carried to the end.
- **Determinism**: every extend request carries a seed derived from the prompt's seed, the block
  and the particle (vLLM gives the j-th of n samples seed + j); SMC's resampling draws from a
  generator seeded the same way. The same prompts and seeds give the same answers.

Shape key: P prompts, K samples per particle, N particles (smc), B blocks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vas_vllm.search.knobs import SearchKnobs


@dataclass
class Continuation:
    """M (or fewer) new tokens; `finished` when the generator stopped on EOS / a stop token."""

    tokens: list[int]
    finished: bool


@dataclass
class Particle:
    """A partial answer to prompt `prompt`: the generated tokens after the prompt."""

    pid: int                          # unique in a run; scorers key their caches by it
    prompt: int                       # index of the prompt in the run
    tokens: list[int]
    finished: bool = False
    parent: int | None = None         # pid of the particle it continues
    score: float = math.nan           # the scorer's (or the reward's) estimate at this prefix
    reward: float | None = None       # the true reward, where it was computed


class Generator(Protocol):
    async def extend(self, prefixes: Sequence[Sequence[int]], k: int, m: int,
                     seeds: Sequence[int]) -> list[list[Continuation]]:
        """k continuations of at most m tokens for each prefix (prompt ids + a particle's
        tokens); seeds: one per prefix, the j-th continuation drawn with seed + j."""
        ...


class Scorer(Protocol):
    has_reward: bool

    async def score(self, particles: Sequence[Particle], remaining: int) -> np.ndarray:
        """[len(particles)] estimates of E[r(final) | particle]; `remaining`: samples the search
        still draws per particle after this boundary (a distributional "max" scorer uses it)."""
        ...

    async def reward(self, particles: Sequence[Particle]) -> np.ndarray:
        """[len(particles)] the true reward of each particle's text."""
        ...

    def retain(self, particles: Sequence[Particle]) -> None:
        """Only these particles (and their descendants) will be extended or scored again."""
        ...


@dataclass
class SearchResult:
    """One prompt's answer and its accounting."""

    prompt: int
    tokens: list[int]
    finished: bool
    score: float                     # what made the final decision (reward or scorer)
    reward: float | None             # the true reward, when the search computed it
    kl_bound: float                  # nats, see the module doc
    decisions: int                   # best_of_k: selections made; smc: resampling events + 1
    gen_tokens: int                  # tokens generated for this prompt, discarded ones included


def bon_kl_bound(k: int) -> float:
    """KL bound of one selection of the best of k samples: log k - (k-1)/k."""
    return math.log(k) - (k - 1) / k


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (vLLM adds j < n to it for the j-th of n samples)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(1)[0]) >> 1


class _Ids:
    def __init__(self) -> None:
        self.next = 0

    def __call__(self) -> int:
        self.next += 1
        return self.next


def _child(new_id: _Ids, p: Particle, c: Continuation) -> Particle:
    return Particle(new_id(), p.prompt, p.tokens + list(c.tokens), c.finished or p.finished, p.pid)


async def _evaluate(scorer: Scorer, children: list[Particle], last: bool, final_reward: bool,
                    remaining: int) -> None:
    """Set each child's score: the reward for finished children (when there is one) and, in the
    last block with final_reward, for all; the scorer for the others."""
    by_reward = [c for c in children if scorer.has_reward and (c.finished or (last and final_reward))]
    by_scorer = [c for c in children if not (scorer.has_reward and (c.finished or (last and final_reward)))]
    if by_reward:
        for c, r in zip(by_reward, await scorer.reward(by_reward)):
            c.score = c.reward = float(r)
    if by_scorer:
        for c, s in zip(by_scorer, await scorer.score(by_scorer, 1 if last else remaining)):
            c.score = float(s)


async def best_of_k(generator: Generator, scorer: Scorer, knobs: SearchKnobs, prompts: Sequence[Sequence[int]],
                    seeds: Sequence[int]) -> list[SearchResult]:
    """Blockwise best-of-K for every prompt (token ids; one seed each); see the module doc."""
    new_id = _Ids()
    P = len(seeds)
    best = [Particle(new_id(), i, []) for i in range(P)]         # [P] the kept particle
    kl = [0.0] * P
    decisions = [0] * P
    gen_tokens = [0] * P
    B = len(knobs.blocks)
    for b, block in enumerate(knobs.blocks):
        live = [p for p in best if not p.finished]
        if not live:
            break
        conts = await generator.extend([list(prompts[p.prompt]) + p.tokens for p in live], block.k,
                                       block.tokens, [derive_seed(seeds[p.prompt], b, 0) for p in live])
        children: list[list[Particle]] = []
        for p, cs in zip(live, conts):
            if len(cs) != block.k:
                raise RuntimeError(f"the generator returned {len(cs)} continuations, {block.k} were asked for")
            children.append([_child(new_id, p, c) for c in cs])
            gen_tokens[p.prompt] += sum(len(c.tokens) for c in cs)
        remaining = math.prod(x.k for x in knobs.blocks[b + 1:])
        await _evaluate(scorer, [c for cs in children for c in cs], b == B - 1, knobs.final_reward,
                        min(remaining, 10**6))
        for p, cs in zip(live, children):
            j = int(np.argmax([c.score for c in cs]))           # the first best on ties
            best[p.prompt] = cs[j]
            if block.k > 1:
                kl[p.prompt] += bon_kl_bound(block.k)
                decisions[p.prompt] += 1
        scorer.retain([p for p in best if not p.finished])
    return [SearchResult(i, p.tokens, p.finished, p.score, p.reward, kl[i], decisions[i], gen_tokens[i])
            for i, p in enumerate(best)]


async def smc(generator: Generator, scorer: Scorer, knobs: SearchKnobs, prompts: Sequence[Sequence[int]],
              seeds: Sequence[int]) -> list[SearchResult]:
    """Block SMC with N = knobs.particles particles per prompt; see the module doc."""
    new_id = _Ids()
    P, N, tau = len(seeds), knobs.particles, knobs.tau
    roots = [Particle(new_id(), i, [], score=0.0) for i in range(P)]
    pop: list[list[Particle]] = [[r] * N for r in roots]          # [P][N] (entries may repeat)
    log_w = np.zeros((P, N))                                      # [P, N]
    events = [0] * P
    gen_tokens = [0] * P
    B = len(knobs.blocks)
    for b, block in enumerate(knobs.blocks):
        # the live entries of each parent particle are extended together: n = its multiplicity
        groups: dict[int, list[tuple[int, int]]] = {}
        parents: dict[int, Particle] = {}
        for i in range(P):
            for j, p in enumerate(pop[i]):
                if not p.finished:
                    groups.setdefault(p.pid, []).append((i, j))
                    parents[p.pid] = p
        if not groups:
            break
        order = list(groups)
        conts = await _extend_groups(generator, prompts, parents, groups, order, block.tokens, seeds, b)
        children: list[tuple[int, int, Particle, Particle]] = []   # (i, j, parent, child)
        for q, cs in zip(order, conts):
            for (i, j), c in zip(groups[q], cs):
                children.append((i, j, parents[q], _child(new_id, parents[q], c)))
                gen_tokens[i] += len(c.tokens)
        await _evaluate(scorer, [c for *_, c in children], b == B - 1, knobs.final_reward, 1)
        for i, j, parent, child in children:
            log_w[i, j] += (child.score - parent.score) / tau
            pop[i][j] = child
        if b == B - 1:
            break
        for i in range(P):
            w = _normalised(log_w[i])
            if 1.0 / float(np.sum(w * w)) < knobs.ess * N:      # ESS = 1 / sum w^2 (sum w = 1)
                rng = np.random.default_rng([seeds[i], b, 1])
                pick = rng.choice(N, size=N, p=w)
                pop[i] = [pop[i][j] for j in pick]
                log_w[i] = 0.0
                events[i] += 1 if N > 1 else 0
        scorer.retain([p for row in pop for p in row if not p.finished])
    results = []
    for i in range(P):
        if knobs.select == "argmax":
            j = int(np.argmax(log_w[i]))
        else:
            j = int(np.random.default_rng([seeds[i], B, 2]).choice(N, p=_normalised(log_w[i])))
        p = pop[i][j]
        n_events = events[i] + (1 if N > 1 else 0)
        results.append(SearchResult(i, p.tokens, p.finished, p.score, p.reward,
                                    n_events * math.log(N), n_events, gen_tokens[i]))
    scorer.retain([])
    return results


async def _extend_groups(generator: Generator, prompts: Sequence[Sequence[int]], parents: dict[int, Particle],
                         groups: dict[int, list[tuple[int, int]]], order: list[int], m: int,
                         seeds: Sequence[int], b: int) -> list[list[Continuation]]:
    """Extend every parent by as many continuations as it has live entries. Parents with the
    same multiplicity go in one extend call (the generator batches them)."""
    by_k: dict[int, list[int]] = {}
    for q in order:
        by_k.setdefault(len(groups[q]), []).append(q)
    out: dict[int, list[Continuation]] = {}
    for k, qs in by_k.items():
        res = await generator.extend([list(prompts[parents[q].prompt]) + parents[q].tokens for q in qs], k, m,
                                     [derive_seed(seeds[parents[q].prompt], b, groups[q][0][1]) for q in qs])
        out.update(zip(qs, res))
    return [out[q] for q in order]


def _normalised(log_w: np.ndarray) -> np.ndarray:
    """exp(log_w) / sum, safely: [N] -> [N]."""
    z = np.exp(log_w - np.max(log_w))
    return z / z.sum()


async def run_search(generator: Generator, scorer: Scorer, knobs: SearchKnobs,
                     prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[SearchResult]:
    """The knobs' rule for every prompt (token ids), one seed each."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds")
    rule = best_of_k if knobs.rule == "best_of_k" else smc
    return await rule(generator, scorer, knobs, prompts, seeds)
