"""A toy generator and scorer for the search rules: a 3-token vocabulary plus EOS, short answers,
and everything enumerable, so a search's output distribution can be written out exactly.

pi(a | s) = softmax of logits drawn once per prefix s from a hash of s; EOS ends an answer.
reward(y) is a fixed random function of the whole answer; the toy value V(s) is the exact
E[reward | s] under pi plus a fixed, prefix-dependent error (so the value ranks imperfectly).
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from vas_vllm.search.rules import Continuation, Particle

VOCAB = 3
EOS = 3
HORIZON = 4


def _unit(*key: object) -> float:
    h = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@lru_cache(maxsize=None)
def probs(prefix: tuple[int, ...]) -> tuple[float, ...]:
    """pi(. | prefix) over VOCAB tokens + EOS (EOS impossible at the empty prefix)."""
    logits = [3.0 * (_unit("logit", prefix, a) - 0.5) for a in range(VOCAB + 1)]
    if not prefix:
        logits[EOS] = -math.inf
    z = [math.exp(x) for x in logits]
    return tuple(x / sum(z) for x in z)


def reward(y: tuple[int, ...]) -> float:
    return round(2.0 * _unit("reward", y) - 1.0, 6)


@lru_cache(maxsize=None)
def true_value(prefix: tuple[int, ...]) -> float:
    """E[reward | prefix] under pi, to the horizon (EOS ends early)."""
    if (prefix and prefix[-1] == EOS) or len(prefix) == HORIZON:
        return reward(prefix)
    return sum(p * true_value(prefix + (a,)) for a, p in enumerate(probs(prefix)) if p > 0)


def noisy_value(prefix: tuple[int, ...], noise: float) -> float:
    return true_value(prefix) + noise * (2.0 * _unit("noise", prefix) - 1.0)


def continuations(prefix: tuple[int, ...], m: int) -> list[tuple[tuple[int, ...], float]]:
    """Every continuation of at most m tokens (shorter when it ends with EOS), with pi."""
    out = []

    def rec(seq: tuple[int, ...], p: float) -> None:
        if len(seq) == m or (seq and seq[-1] == EOS):
            out.append((seq, p))
            return
        for a, q in enumerate(probs(prefix + seq)):
            if q > 0:
                rec(seq + (a,), p * q)

    rec((), 1.0)
    return out


class ToyGenerator:
    """rules.Generator: the j-th of k continuations of particle i is drawn with seed seeds[i] + j."""

    def __init__(self) -> None:
        self.calls = 0

    async def extend(self, prefixes: Sequence[Sequence[int]], k: int, m: int,
                     seeds: Sequence[int]) -> list[list[Continuation]]:
        self.calls += 1
        out = []
        for prefix, seed in zip(prefixes, seeds):
            conts = []
            for j in range(k):
                rng = np.random.default_rng(seed + j)
                seq: list[int] = []
                while len(seq) < m:
                    a = int(rng.choice(VOCAB + 1, p=probs(tuple(prefix) + tuple(seq))))
                    seq.append(a)
                    if a == EOS:
                        break
                conts.append(Continuation(seq, bool(seq) and seq[-1] == EOS))
            out.append(conts)
        return out


class ToyScorer:
    """rules.Scorer over the toy: noisy_value as the scorer, reward as the reward."""

    def __init__(self, noise: float = 0.3, has_reward: bool = True) -> None:
        self.noise, self.has_reward = noise, has_reward
        self.retained: list[int] = []

    async def score(self, particles: Sequence[Particle], remaining: int) -> np.ndarray:
        return np.array([noisy_value(tuple(p.tokens), self.noise) for p in particles])

    async def reward(self, particles: Sequence[Particle]) -> np.ndarray:
        return np.array([reward(tuple(p.tokens)) for p in particles])

    def retain(self, particles: Sequence[Particle]) -> None:
        self.retained = [p.pid for p in particles]


def answers(m_total: int = HORIZON) -> dict[tuple[int, ...], float]:
    """pi_ref over whole answers."""
    return dict(continuations((), m_total))


def best_of_k_exact(blocks: Sequence[tuple[int, int]], noise: float, final_reward: bool,
                    has_reward: bool = True) -> tuple[dict[tuple[int, ...], float], float]:
    """The exact output distribution of blockwise best-of-K on the toy, and E[KL bound].

    A decision among K iid continuations that keeps the first best: continuation c is kept with
    probability p(c) * sum_j F<(c)^j F<=(c)^(K-1-j) (the j before it strictly worse, the K-1-j
    after it no better)."""
    out: dict[tuple[int, ...], float] = {}
    exp_bound = 0.0

    def score(seq: tuple[int, ...], last: bool) -> float:
        finished = bool(seq) and seq[-1] == EOS
        if has_reward and (finished or (last and final_reward)):
            return reward(seq)
        return noisy_value(seq, noise)

    def rec(prefix: tuple[int, ...], b: int, p: float, bound: float) -> None:
        nonlocal exp_bound
        if b == len(blocks) or (prefix and prefix[-1] == EOS):
            out[prefix] = out.get(prefix, 0.0) + p
            exp_bound += p * bound
            return
        m, k = blocks[b]
        conts = [(prefix + c, q) for c, q in continuations(prefix, m)]
        scores = [score(s, b == len(blocks) - 1) for s, _ in conts]
        step = math.log(k) - (k - 1) / k if k > 1 else 0.0
        for (s, q), sc in zip(conts, scores):
            below = sum(q2 for (_, q2), s2 in zip(conts, scores) if s2 < sc)
            at_most = sum(q2 for (_, q2), s2 in zip(conts, scores) if s2 <= sc)
            keep = q * sum(below ** j * at_most ** (k - 1 - j) for j in range(k))
            if keep > 0:
                rec(s, b + 1, p * keep, bound + step)

    rec((), 0, 1.0, 0.0)
    return out, exp_bound


def smc_exact(blocks: Sequence[int], n: int, tau: float, ess: float,
              select: str) -> dict[tuple[int, ...], float]:
    """The exact output distribution of block SMC with n particles on the toy (reward at the
    end, finished particles scored by the reward), by enumerating every proposal, resampling
    and final pick."""
    out: dict[tuple[int, ...], float] = {}
    B = len(blocks)

    def step(b: int, pop: list[tuple[tuple[int, ...], float, float]], p: float) -> None:
        # pop: (prefix, twist score, log weight) per particle
        if b == B:
            return
        m = blocks[b]
        options = []
        for prefix, twist, lw in pop:
            if prefix and prefix[-1] == EOS:
                options.append([((prefix, twist, lw), 1.0)])
                continue
            row = []
            for c, q in continuations(prefix, m):
                s = prefix + c
                sc = reward(s) if (b == B - 1 or s[-1] == EOS) else noisy_value(s, 0.3)
                row.append(((s, sc, lw + (sc - twist) / tau), q))
            options.append(row)
        for combo in itertools.product(*options):
            q = math.prod(x[1] for x in combo)
            new = [x[0] for x in combo]
            lws = np.array([x[2] for x in new])
            w = np.exp(lws - lws.max())
            w /= w.sum()
            if b == B - 1:
                picks = ([(int(np.argmax(lws)), 1.0)] if select == "argmax"
                         else [(j, float(w[j])) for j in range(n)])
                for j, pj in picks:
                    out[new[j][0]] = out.get(new[j][0], 0.0) + p * q * pj
            elif 1.0 / float(np.sum(w * w)) < ess * n:
                for idx in itertools.product(range(n), repeat=n):
                    pi = math.prod(float(w[j]) for j in idx)
                    step(b + 1, [(new[j][0], new[j][1], 0.0) for j in idx], p * q * pi)
            else:
                step(b + 1, new, p * q)

    step(0, [((), 0.0, 0.0)] * n, 1.0)
    return out
