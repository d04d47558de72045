"""Remote VAS's step math (vas_vllm/remote/steps.py) against slow full-vocabulary references on
fresh random inputs: the (K + 1)-way table and the greedy pick equal what the plugin's processed
logits give over the whole vocabulary; the two-coin sampler and the rest draw sample their targets
(Monte Carlo, 5-sigma bounds)."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from vas_vllm.remote import steps

V, K = 40, 5


def _case(seed: int, B: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g, dtype=torch.float64) * 2.0              # [B, V]
    cand = logits.topk(K, dim=1).indices                                            # [B, K]
    delta = torch.randn(B, K, generator=g, dtype=torch.float64) * 1.5
    rest = torch.randn(B, generator=g, dtype=torch.float64)
    return logits, cand, delta, rest


def _processed(logits, cand, delta, rest, mask):
    """The plugin's processed logits over the vocabulary: l + delta - rest on C, l elsewhere."""
    out = logits.clone()
    out.scatter_add_(1, cand, delta - rest[:, None])
    if mask is not None:
        keep = out.gather(1, cand)
        out = torch.where(mask[:, None], torch.full_like(out, -math.inf), out).scatter(1, cand, keep)
    return out


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_step_table_is_the_processed_softmax_over_topk_and_rest(temperature):
    seed = int(np.random.SeedSequence().entropy % 2**31)  # fresh inputs every run
    logits, cand, delta, rest = _case(seed)
    mask = torch.tensor([False, True, False, False])
    lp = torch.log_softmax(logits / temperature, dim=1).gather(1, cand)             # log pi_T on C
    valid = steps.valid_candidates(lp)
    scale = torch.full((4,), temperature, dtype=torch.float64)
    table = steps.step_table(lp, valid, delta, rest, scale, mask).exp()             # [B, K + 1]
    p = torch.softmax(_processed(logits, cand, delta, rest, mask) / temperature, dim=1)   # [B, V]
    in_c = p.gather(1, cand)
    ref = torch.cat((in_c, (1 - in_c.sum(1, keepdim=True)).clamp(min=0)), dim=1)
    # float64 both ways (log-space table vs softmax over V = O(1e2)): rounding ~1e-15
    torch.testing.assert_close(table, ref, atol=1e-12, rtol=0, msg=f"seed {seed}")
    assert float(table[1, K]) == 0.0  # masked row: nothing outside the top-k


def test_greedy_choice_is_the_argmax_of_the_processed_logits():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    logits, cand, delta, rest = _case(seed, B=64)
    rest[::2] += 8.0  # every other row: the candidates all lose to the best token outside C
    ordered = logits.topk(K + 1, dim=1).indices
    lp = torch.log_softmax(logits, dim=1)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[::4] = True
    cols = steps.greedy_choice(lp.gather(1, cand), torch.ones(64, K, dtype=torch.bool), delta, rest,
                               lp.gather(1, ordered[:, K:])[:, 0], mask)
    best = _processed(logits, cand, delta, rest, mask).argmax(1)
    picked = torch.where(cols < K, cand.gather(1, cols.clamp(max=K - 1)[:, None])[:, 0], ordered[:, K])
    assert torch.equal(picked, best), f"seed {seed}"
    assert (cols == K).any() and (cols < K).any(), "both outcomes must occur (else the test is moot)"


def _draws(pi: np.ndarray, rng: np.random.Generator):
    async def draw(_attempt: int) -> int:
        return int(rng.choice(len(pi), p=pi))
    return draw


def _within(freq: np.ndarray, p: np.ndarray, n: int) -> None:
    sigma = np.sqrt(p * (1 - p) / n)
    # sampling noise, not rounding: 5 binomial sigmas (+1e-3 where p(1 - p) ~ 0)
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-3), f"frequencies {freq.round(4)} vs {p.round(4)}"


@pytest.mark.parametrize("case", ["topk_light", "topk_heavy"])
def test_two_coin_samples_the_mean_rule_target(case):
    entropy = np.random.SeedSequence().entropy
    rng = np.random.default_rng(entropy)
    n_vocab, k, n = 8, 3, 20000
    pi = rng.dirichlet(np.full(n_vocab, 0.7))
    order = np.argsort(-pi)
    if case == "topk_heavy":  # the top-k hold most of the mass and the shifts favour them
        pi = np.sort(rng.dirichlet(np.full(n_vocab, 0.3)))[::-1]
        order = np.arange(n_vocab)
    cand = [int(t) for t in order[:k]]
    shift = rng.normal(0.0, 1.5, size=k)
    g = np.ones(n_vocab)
    g[cand] = np.exp(shift)
    target = pi * g / (pi * g).sum()
    log_pi = np.log(pi[cand]) + 3.0  # known up to a constant only
    draw_rng = np.random.default_rng(entropy + 1)

    async def run() -> tuple[np.ndarray, int]:
        counts, extra = np.zeros(n_vocab), 0
        for i in range(n):  # half the calls come with a sample at hand, half without
            first = int(draw_rng.choice(n_vocab, p=pi)) if i % 2 else None
            token, used = await steps.two_coin(rng, log_pi, shift, cand, first, _draws(pi, draw_rng), 10_000)
            counts[token] += 1
            extra += used + (first is not None)
        return counts / n, extra

    freq, draws = asyncio.run(run())
    _within(freq, target, n)
    m = pi[cand].sum()
    G = (pi[cand] / m * np.exp(shift)).sum()
    expected = (G + 1) / (m * G + 1 - m)  # draws per token, the one at hand included
    assert abs(draws / n - expected) < 0.05 * expected, (draws / n, expected)


def test_pick_rest_keeps_the_restricted_distribution_and_redraws_candidates():
    """A biased draw (candidates scaled down, as logit_bias -100 at a high temperature does) that
    is redrawn whenever it returns a candidate yields pi restricted to the rest, exactly."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    n_vocab, cand = 6, [0, 1]
    pi = rng.dirichlet(np.ones(n_vocab))
    biased = pi.copy()
    biased[cand] *= 0.5  # a weak bias: candidates come back often
    biased /= biased.sum()
    n = 20000

    async def run() -> tuple[np.ndarray, int]:
        counts, draws = np.zeros(n_vocab), 0
        for _ in range(n):
            token, used = await steps.pick_rest(0, cand, _draws(biased, rng), 1000)
            counts[token] += 1
            draws += used
        return counts / n, draws

    freq, draws = asyncio.run(run())
    target = pi.copy()
    target[cand] = 0
    _within(freq, target / target.sum(), n)
    assert draws > n  # candidates did come back and were redrawn

    assert asyncio.run(steps.pick_rest(4, cand, _draws(biased, rng), 3)) == (4, 0)  # the free sample
    token, used = asyncio.run(steps.pick_rest(None, cand, _draws(biased, rng), 1000))  # none at hand
    assert token not in cand and used >= 1
    with pytest.raises(RuntimeError, match="3 draws with logit_bias -100"):
        asyncio.run(steps.pick_rest(0, cand, _draws(np.array([1.0, 0, 0, 0, 0, 0]), rng), 3))


def test_sample_column_never_picks_a_column_without_mass():
    row = np.array([-np.inf, np.log(0.25), -np.inf, np.log(0.75), -np.inf])
    picks = {steps.sample_column(row, u) for u in np.linspace(0, 1, 1001)[:-1]}
    assert picks == {1, 3}
    assert steps.sample_column(row, np.nextafter(1.0, 0.0)) == 3
