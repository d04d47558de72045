"""TD(lambda) targets, value positions and loss against direct loops over the equations of
docs/vas-algorithm.md."""
from __future__ import annotations

import random

import pytest
import torch

from fp_bounds import U32, RoundingTracer, assert_within
from value_models.training.td import (
    distributional_loss, distributional_targets, lambda_returns, pack_batch, response_values,
    td_loss, two_hot,
)
from value_models.training.trainer import position_values
from value_reference import RUNTIME_SLACK, Float64ValueModel


def reference_targets(values: list[float], reward: float, gamma: float, lam: float) -> list[float]:
    """vas-algorithm.md, literally: one episode of T = len(values) tokens."""
    T = len(values)
    rew = [0.0] * T
    rew[T - 1] = reward
    v = list(values) + [0.0]  # V_old[T] = 0
    adv = [0.0] * (T + 1)
    for t in range(T - 1, -1, -1):
        delta = rew[t] + gamma * v[t + 1] - v[t]
        adv[t] = delta + gamma * lam * adv[t + 1]
    return [adv[t] + v[t] for t in range(T)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 0.0), (1.0, 1.0), (0.0, 0.7)])
def test_lambda_returns_matches_the_loop(gamma: float, lam: float) -> None:
    rng = random.Random(f"{gamma}-{lam}")
    for trial in range(20):
        B, T = rng.randint(1, 6), rng.randint(1, 40)
        lengths = [rng.randint(1, T) for _ in range(B)]
        lengths[rng.randrange(B)] = T  # at least one full row
        values = torch.randn(B, T, generator=torch.Generator().manual_seed(trial))
        values[0, -1] = 1e6 if lengths[0] < T else values[0, -1]  # padding must be ignored
        rewards = torch.randn(B, generator=torch.Generator().manual_seed(100 + trial)) * 3
        got = lambda_returns(values, rewards, torch.tensor(lengths), gamma, lam)
        assert got.shape == (B, T) and got.dtype == torch.float32
        # the bound: lambda_returns itself on float64 shadows of its float32 inputs
        v64, r64 = values.double().requires_grad_(), rewards.double().requires_grad_()
        tr = RoundingTracer()
        with tr:
            shadow = lambda_returns(v64, r64, torch.tensor(lengths), gamma, lam)
        bound = tr.bound(shadow)
        for b in range(B):
            n = lengths[b]
            ref = reference_targets(values[b, :n].tolist(), float(rewards[b]), gamma, lam)  # float64: exact here
            assert_within(got[b, :n], torch.tensor(ref, dtype=torch.float64), bound[b, :n], f"trial {trial}, row {b}")
            assert torch.all(got[b, n:] == 0), f"row {b}: expected zeros past length {n}"


def test_lambda_returns_special_cases() -> None:
    # torch's float32 defaults (rtol 1.3e-6, atol 1e-5): a few roundings of O(1) values
    v = torch.tensor([[0.3, -0.2, 0.5, 0.1]])
    r, n = torch.tensor([2.0]), torch.tensor([4])
    # lambda = 1, gamma = 1: the Monte-Carlo return, r everywhere, whatever V says.
    torch.testing.assert_close(lambda_returns(v, r, n, 1.0, 1.0), torch.full((1, 4), 2.0))
    # lambda = 0: one-step TD, target[t] = V[t+1] and r at the end.
    torch.testing.assert_close(lambda_returns(v, r, n, 1.0, 0.0), torch.tensor([[-0.2, 0.5, 0.1, 2.0]]))
    # a one-token response: target = r
    torch.testing.assert_close(lambda_returns(v[:, :1], r, torch.tensor([1]), 1.0, 0.95), r[:, None])


def test_lambda_returns_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"lengths must lie in 1..T=3, found \[0\]"):
        lambda_returns(torch.zeros(1, 3), torch.zeros(1), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"rewards and lengths must be \[B\]=\[2\]"):
        lambda_returns(torch.zeros(2, 3), torch.zeros(3), torch.tensor([1, 2]))


def test_td_loss_is_half_mean_over_real_tokens() -> None:
    v = torch.tensor([[1.0, 2.0, 9.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    expected = 0.5 * (1 + 4 + 1 + 1 + 1) / 5
    assert float(td_loss(v, t, mask)) == pytest.approx(expected)  # rel 1e-6: small integers, ~3 roundings


def test_positions_match_uncached_single_sequences(tiny_pair_random_head) -> None:
    """V[t] from one padded batch equals the head at the last token of x + y_1..y_t run alone."""
    from transformers import LlamaForSequenceClassification

    _, value_dir = tiny_pair_random_head
    model = LlamaForSequenceClassification.from_pretrained(value_dir, dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(1, 7))] for _ in range(4)]
    responses = [[rng.randrange(100, 40000) for _ in range(rng.randint(1, 9))] for _ in range(4)]
    responses[1] = responses[1][:-1] + [2]  # ends with eos == pad: the pooled-output trap
    ids, plens, lens = pack_batch(prompts, responses, pad_id=2)
    assert ids.shape == (4, max(len(p) + len(r) - 1 for p, r in zip(prompts, responses)))
    ref = Float64ValueModel(value_dir)
    with torch.no_grad():
        values, mask = response_values(position_values(model, ids), plens, lens)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        for t in range(len(r)):   # the head at the last token of p + r[:t]: float64, and its bound
            _, _, want, bound = ref.bounded(p + r[:t], [])
            assert_within(values[b, t], want[0], RUNTIME_SLACK * bound[0], f"row {b}, position {t}")
        assert not mask[b, len(r):].any() and mask[b, :len(r)].all()


def reference_distributional_targets(p_old: list[list[float]], terminal: list[float],
                                     lam: float) -> list[list[float]]:
    """td.py's module doc, literally: m[T-1] = twohot(r), m[t] = (1-lam) p_old[t+1] + lam m[t+1]."""
    T = len(p_old)
    m = [terminal]
    for t in range(T - 2, -1, -1):
        m.insert(0, [(1 - lam) * a + lam * b for a, b in zip(p_old[t + 1], m[0])])
    return m


@pytest.mark.parametrize("lam", [0.95, 0.5, 0.0, 1.0])
def test_distributional_targets_match_the_loop(lam: float) -> None:
    rng = random.Random(f"dist-{lam}")
    for trial in range(10):
        B, T, O = rng.randint(1, 5), rng.randint(1, 30), rng.randint(2, 9)
        lengths = [rng.randint(1, T) for _ in range(B)]
        lengths[rng.randrange(B)] = T
        g = torch.Generator().manual_seed(trial)
        logits_old, logits_term = torch.randn(B, T, O, generator=g), torch.randn(B, O, generator=g) * 3
        p_old, terminal = torch.softmax(logits_old, -1), torch.softmax(logits_term, -1)
        got = distributional_targets(p_old, terminal, torch.tensor(lengths), lam)
        assert got.shape == (B, T, O)
        # the bound: the softmaxes and distributional_targets themselves on float64 shadows of
        # their float32 inputs (the sums are 1 up to the softmaxes' rounding too)
        l_old, l_term = logits_old.double().requires_grad_(), logits_term.double().requires_grad_()
        tr = RoundingTracer()
        with tr:
            shadow = distributional_targets(torch.softmax(l_old, -1), torch.softmax(l_term, -1),
                                            torch.tensor(lengths), lam)
            sums = shadow.sum(-1)                        # the test's own float32 sums
        bound, sum_bound = tr.bound(shadow), tr.bound(sums)
        for b in range(B):
            n = lengths[b]
            ref = reference_distributional_targets(p_old[b, :n].tolist(), terminal[b].tolist(), lam)
            assert_within(got[b, :n], torch.tensor(ref, dtype=torch.float64), bound[b, :n], f"trial {trial}, row {b}")
            assert torch.all(got[b, n:] == 0)
            assert_within(got[b, :n].sum(-1), torch.ones(n, dtype=torch.float64), sum_bound[b, :n], "Σ_b = 1")
    # lam = 1 needs no model: the targets are the terminal projection everywhere (copies: exact)
    term = torch.tensor([[0.25, 0.75]])
    torch.testing.assert_close(distributional_targets(None, term, torch.tensor([3]), 1.0),
                               term[:, None].expand(1, 3, 2))


def test_two_hot_keeps_the_mean_and_clamps() -> None:
    bins = torch.tensor([-1.0, -0.2, 0.0, 0.5, 1.0])
    r = torch.tensor([-1.0, -0.6, 0.0, 0.3, 0.99, 1.0, 7.0, -3.0])
    m = two_hot(r, bins)
    # two weights, each float64 then stored in float32 (u each), summed: float32 defaults hold
    torch.testing.assert_close(m.sum(-1), torch.ones(8))
    # the mean: two float32 weights (u|m| each) times bins, 5 products and 4 adds (u each) of
    # terms <= max|bin|: under 11 u max|bin|
    torch.testing.assert_close((m * bins).sum(-1), r.clamp(-1, 1), atol=11 * U32 * float(bins.abs().max()), rtol=0)
    assert (m > 0).sum(-1).max() <= 2
    torch.testing.assert_close(m[2], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))  # on a bin: one-hot, exact


def test_distributional_loss_is_cross_entropy_over_real_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g)
    targets = torch.softmax(torch.randn(2, 3, 4, generator=g), -1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = distributional_loss(logits, targets, mask)
    # both float32 results within their bounds of the float64 value: within the sum of the two
    l64, t64 = logits.double().requires_grad_(), targets.double().requires_grad_()
    tr = RoundingTracer()
    with tr:
        shadow_got = distributional_loss(l64, t64, mask)
        shadow_want = sum(-(t64[b, t] * torch.log_softmax(l64[b, t], -1)).sum()
                          for b, t in [(0, 0), (0, 1), (1, 0)]) / 3
    want = sum(-(targets[b, t] * torch.log_softmax(logits[b, t], -1)).sum()
               for b, t in [(0, 0), (0, 1), (1, 0)]) / 3
    bound = tr.bound(torch.stack([shadow_got, shadow_want])).sum()
    assert_within(got, want.double(), bound, "loss vs explicit sum")
