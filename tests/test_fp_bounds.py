"""The float32 error bounds of fp_bounds.py hold, and are tight enough to catch real bugs.

For each computation: run it in float32, run it in float64 under a RoundingTracer, and check
|f32 - f64| <= bound on fresh random inputs; then check the bound is not vacuous (within 1e3 of
the largest error observed) and that a planted O(1e-2) bug exceeds it.
"""
from __future__ import annotations

import random

import pytest
import torch

from fp_bounds import RoundingTracer, U64, assert_within, gamma
from value_reference import Float64ValueModel, make_tiny_value_model


def traced(f, *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 result, float64 result, probabilistic bound, worst-case bound) of f(*xs)."""
    got = f(*xs)
    shadows = [x.double().requires_grad_() for x in xs]   # before the tracer: inside, .double() is a cast
    tr = RoundingTracer()
    with tr:
        want = f(*shadows)
    prob, worst = tr.bounds(want)
    return got, want.detach(), prob, worst


def _observed_over_bound(got, want, bound) -> float:
    return float(((got.double() - want).abs() / bound).max())


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 20000])
def test_dot_products_sums_and_matmuls(n):
    gen = torch.Generator().manual_seed(n)
    worst_ratio = 0.0
    for trial in range(4):
        a = torch.randn(n, generator=gen) * 10 ** trial
        b = torch.randn(n, generator=gen) + (trial == 3) * 3.0      # a biased b: large partial sums
        for f in (lambda x, y: x @ y, lambda x, y: (x * y).sum(), lambda x, y: (x.abs() + y).mean(),
                  lambda x, y: torch.cumsum(x * y, 0)[-1:], lambda x, y: torch.nn.functional.linear(
                      x[None], torch.stack([y, -y, y * 0.5]), torch.tensor([1.0, -2.0, 0.5]))):
            got, want, prob, worst = traced(f, a, b)
            assert_within(got, want, prob, f"n={n}, trial {trial}: probabilistic")
            assert_within(got, want, worst, f"n={n}, trial {trial}: worst case")
            assert bool((prob <= worst).all())
            worst_ratio = max(worst_ratio, _observed_over_bound(got, want, prob))
    if n >= 64:  # long sums round on every add: the bound follows the observed error
        assert worst_ratio > 1e-3, f"the bound is over 1e3 times the largest error seen ({worst_ratio:.2g})"


def test_softmax_log_softmax_logsumexp_with_masked_entries():
    gen = torch.Generator().manual_seed(0)
    ratio = 0.0
    for scale in (0.1, 3.0, 30.0):
        x = torch.randn(6, 3000, generator=gen) * scale
        x[:, ::7] = float("-inf")
        for f in (lambda t: torch.softmax(t, -1)[:, :40], lambda t: torch.log_softmax(t, -1)[:, 1:40],
                  lambda t: torch.logsumexp(t, -1)):
            got, want, prob, _ = traced(f, x)
            assert_within(got, want, prob, f"scale {scale}")
            ratio = max(ratio, _observed_over_bound(got, want, prob))
    assert ratio > 1e-3, ratio


def test_conservation_step_bound_follows_its_condition_number():
    """log(h - s) for h -> s: the error of the float32 operands is amplified by h / (h - s), and
    the bound grows with it (a constant tolerance could not follow)."""
    rng = random.Random(0)
    bounds = []
    for gap in (1e-1, 1e-3, 1e-5):
        for _ in range(20):
            h = rng.uniform(0.5, 2.0)
            s = h * (1 - gap * rng.uniform(0.5, 1.5))
            h32, s32 = torch.tensor(h, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
            got = torch.log(torch.exp(torch.log(h32)) - torch.exp(torch.log(s32)))   # log-space operands
            tr = RoundingTracer()
            with tr:   # the operands as float32 values of the exact h, s: one rounding each
                lh, ls = torch.log(tr.rounded(h)), torch.log(tr.rounded(s))
                want = torch.log(torch.exp(lh) - torch.exp(ls))
            b = tr.bound(want)
            exact = torch.tensor(h - s, dtype=torch.float64).log()
            assert_within(got, exact, b, f"gap {gap}")
            bounds.append(float(b))
    lo, mid, hi = (sorted(bounds[i * 20:(i + 1) * 20])[10] for i in range(3))
    assert 30 < mid / lo and 30 < hi / mid, (lo, mid, hi)   # ~ 1 / gap


def test_float64_stages_are_charged_their_own_unit():
    x = torch.randn(100, dtype=torch.float64)
    f = lambda t: (t * 3.0).sum()  # noqa: E731
    tr32, tr64 = RoundingTracer(), RoundingTracer()
    with tr32:
        y32 = f(x.clone().requires_grad_())
    with tr64, tr64.unit(U64):
        y64 = f(x.clone().requires_grad_())
    b32, b64 = tr32.bound(y32), tr64.bound(y64)
    assert abs(float(b64 / b32) - U64 / 2.0 ** -24) < 1e-3 * U64 / 2.0 ** -24


def test_an_op_without_a_rule_or_in_place_raises():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no rounding rule for 'cosh'"), RoundingTracer():
        torch.cosh(x)
    with pytest.raises(NotImplementedError, match="in-place"), RoundingTracer():
        x.clone().add_(1.0)
    x32 = x.detach().float().requires_grad_()
    with pytest.raises(RuntimeError, match="lost precision"), RoundingTracer():
        x32 * 2.0


@pytest.fixture(scope="module")
def tiny_value_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp-bounds-model")
    fp32 = make_tiny_value_model(folder, seed=7, hidden=64, heads=4, kv_heads=2, num_labels=5)
    return folder, fp32


def test_a_tiny_llama_value_model_in_float32_is_within_the_bound(tiny_value_model):
    """HF's float32 forward, batched over candidates (other kernels and order than the float64
    reference's cached structure), against the float64 reference; and the bound is far below an
    O(1e-2) bug, and within 1e3 of the largest error seen."""
    folder, fp32 = tiny_value_model
    ref = Float64ValueModel(folder)
    rng = random.Random(0)
    ratio = 0.0
    for trial in range(3):
        hist = [rng.randrange(101) for _ in range(rng.randint(1, 30))]
        cands = rng.sample(range(101), 5)
        want, bound, want_prefix, bound_prefix = ref.bounded(hist, cands)
        with torch.no_grad():
            got = fp32.score(fp32.model(input_ids=torch.tensor([hist + [a] for a in cands])).last_hidden_state[:, -1])
            got_prefix = fp32.score(fp32.model(input_ids=torch.tensor([hist])).last_hidden_state[0, -1])
        assert_within(got, want, bound, f"trial {trial}: candidates")
        assert_within(got_prefix, want_prefix, bound_prefix, f"trial {trial}: prefix")
        assert float(bound.max()) < 1e-3, f"the bound {float(bound.max()):.2g} would hide an O(1e-2) bug"
        ratio = max(ratio, _observed_over_bound(got, want, bound))
        with pytest.raises(AssertionError, match="exceed the float32 error bound"):
            assert_within(got + 1e-2 * torch.randn_like(got).sign(), want, bound, "a planted 1e-2 bug")
    assert ratio > 1e-3, f"the bound is over 1e3 times the largest error seen ({ratio:.2g})"


def test_the_cached_runtime_is_within_twice_the_bound_and_a_wrong_position_is_not(tiny_value_model, monkeypatch):
    """The runtime's algorithm (cache, merged softmax) is allowed RUNTIME_SLACK x the bound of
    the reference's; a runtime that scores candidates one position too far is caught."""
    from value_reference import RUNTIME_SLACK as SLACK
    from vas_vllm.runtime import ValueRuntime
    import vas_vllm.runtime.value_runtime as vr

    folder, _ = tiny_value_model
    ref = Float64ValueModel(folder)
    rng = random.Random(1)
    hists = [[rng.randrange(101) for _ in range(n)] for n in (3, 17, 40)]
    cands = torch.tensor([rng.sample(range(101), 6) for _ in hists])

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        rt = ValueRuntime.from_pretrained(folder, max_slots=4, max_len=64, max_candidates=8)
        slots = [rt.allocate() for _ in hists]
        return rt.score(slots, hists, cands), rt.prefix_outputs(slots)

    got, prefix = run()
    refs = [ref.bounded(h, c.tolist()) for h, c in zip(hists, cands)]
    for b, (want, bound, want_prefix, bound_prefix) in enumerate(refs):
        assert_within(got[b], want, SLACK * bound, f"row {b}")
        assert_within(prefix[b], want_prefix, SLACK * bound_prefix, f"prefix of row {b}")
    forward = vr.ValueRuntime._forward

    def one_too_far(self, tokens, positions, mask, slots, lengths, sink):  # candidates: mask None
        return forward(self, tokens, positions + (mask is None), mask, slots, lengths, sink)

    monkeypatch.setattr(vr.ValueRuntime, "_forward", one_too_far)
    got, _ = run()
    failures = 0
    for b, (want, bound, _, _) in enumerate(refs):
        try:
            assert_within(got[b], want, SLACK * bound)
        except AssertionError:
            failures += 1
    assert failures == len(hists), "a wrong position went through"


def test_gamma():
    u = 2.0 ** -24
    assert gamma(0) == 0 and gamma(10) == 10 * u / (1 - 10 * u)
    with pytest.raises(AssertionError):
        gamma(2 ** 24)
