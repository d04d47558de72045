"""The re-weighting rules (vas_vllm/tilts.py) on toy trees where everything is enumerable.

A toy tree: a vocabulary of 3 to 5 tokens, texts of a fixed length 3 or 4, pi_ref a fixed random
table of next-token distributions, rewards a fixed table on the leaves (with ties). The value
model is replaced by the exact distribution of R under pi_ref at every prefix, computed by
enumeration, and fed to the same reduction code the processor uses. Guided sampling must then
give exactly the target p* over all texts: the exponential tilt, Best-of-N and the threshold. The
paper's mean rule must NOT give the tilt at beta >= 1 (the test can tell the rules apart).

"Exactly" means within the float32 error bound of the processor's own computation: the guided
probabilities are computed by the processor's code run in float64 under a fp_bounds
RoundingTracer, every float32 input (logits, bins, log p) rounded once, so the bound follows the
float32 and float64 steps of tilts.py as they are written.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fp_bounds import RoundingTracer, assert_within
from vas_vllm import tilts


class ToyTree:
    def __init__(self, vocab: int, depth: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.vocab, self.depth = vocab, depth
        # next-token logits of pi_ref at every prefix (a tuple of tokens)
        self.logits = {p: rng.normal(0.0, 1.5, vocab) for d in range(depth)
                       for p in itertools.product(range(vocab), repeat=d)}
        self.leaves = list(itertools.product(range(vocab), repeat=depth))
        # rewards with ties: 7 distinct values on vocab**depth leaves
        values = np.round(rng.normal(0.0, 1.0, 7), 2)
        self.reward = {y: float(values[rng.integers(7)]) for y in self.leaves}
        self.bins = np.array(sorted(set(self.reward.values())))

    def pi(self, prefix: tuple) -> np.ndarray:
        z = np.exp(self.logits[prefix] - self.logits[prefix].max())
        return z / z.sum()

    def leaf_prob(self, y: tuple, policy) -> float:
        return math.prod(policy(y[:t])[y[t]] for t in range(self.depth))

    def dist(self, prefix: tuple) -> np.ndarray:
        """Exact distribution of R over the bins under pi_ref continuing `prefix`: [O]."""
        out = np.zeros(len(self.bins))
        for y in self.leaves:
            if y[:len(prefix)] == prefix:
                p = math.prod(self.pi(y[:t])[y[t]] for t in range(len(prefix), self.depth))
                out[np.searchsorted(self.bins, self.reward[y])] += p
        return out

    def ref(self) -> dict[tuple, float]:
        return {y: self.leaf_prob(y, self.pi) for y in self.leaves}


def logp_of(dist: np.ndarray, tr: RoundingTracer | None = None) -> torch.Tensor:
    """log of an exact distribution as float32 (under a tracer: its float64 shadow, rounded once)."""
    with np.errstate(divide="ignore"):
        logp = np.log(dist)
    return tr.rounded(logp) if tr is not None else torch.tensor(logp, dtype=torch.float32)


def _once(fn):
    """fn with its results kept: an input stored in float32 twice is the same rounding twice,
    so the traced computation must read one rounded copy wherever the code reads it."""
    cache: dict = {}
    return lambda key: cache[key] if key in cache else cache.setdefault(key, fn(key))


class Inputs:
    """The float32 inputs of the guided policies: bins, each prefix's logits and log p (under a
    tracer, rounded float64 shadows, each rounded once however often it is read)."""

    def __init__(self, tree: ToyTree, tr: RoundingTracer | None = None) -> None:
        self.f32 = lambda x: tr.rounded(x) if tr is not None else torch.tensor(x, dtype=torch.float32)  # noqa: E731
        self.bins = self.f32(tree.bins)                                       # [O]
        self.logits = _once(lambda prefix: self.f32(tree.logits[prefix]))    # [V]
        self.logp = _once(lambda prefix: logp_of(tree.dist(prefix), tr))     # [O]


def guided_exact(tree: ToyTree, log_w_of, top_k: int | None = None, tr: RoundingTracer | None = None,
                 inputs: Inputs | None = None):
    """The guided policy with exact h: the processor's reduction on every prefix. With a tracer,
    the same code runs on float64 shadows of its float32 inputs and records its rounding."""
    inputs = inputs or Inputs(tree, tr)
    log_w = log_w_of(inputs.bins, inputs.f32)                                 # [O]
    k = top_k or tree.vocab
    logp = inputs.logp
    cache: dict[tuple, torch.Tensor] = {}

    def policy(prefix: tuple) -> torch.Tensor:
        if prefix in cache:
            return cache[prefix]
        l = inputs.logits(prefix)                                             # [V]
        cand = l.topk(k).indices                                              # [K]
        logpi = torch.log_softmax(l.double(), -1)
        cand_lh = torch.stack([tilts.log_h(logp(prefix + (int(a),)), log_w) for a in cand])  # [K]
        prefix_lh = tilts.log_h(logp(prefix), log_w)
        shift, rest, clamped = tilts.exact_shifts(
            logpi[cand][None], torch.ones(1, k, dtype=torch.bool), cand_lh[None], prefix_lh[None],
            log_w.max()[None])
        assert not bool(clamped[0]), "exact h must never need a clamp"
        out = (l + rest[0]).scatter(0, cand, l[cand] + shift[0])
        cache[prefix] = torch.softmax(out.double(), -1)                       # [V]
        return cache[prefix]
    return policy


def check_guided(tree: ToyTree, log_w_of, p_star: dict[tuple, float]) -> None:
    """Every leaf's guided probability equals p* within the float32 bound of its computation."""
    tr = RoundingTracer()
    with tr:
        policy = guided_exact(tree, log_w_of, tr=tr)
        got = torch.stack([tree.leaf_prob(y, policy) for y in tree.leaves])   # [leaves]
    # float64 sums of at most 625 leaf probabilities: off by 1e-13 at most
    assert abs(float(got.detach().sum()) - 1.0) < 1e-9
    want = torch.tensor([p_star[y] for y in tree.leaves], dtype=torch.float64)
    assert_within(got.detach(), want, tr.bound(got), "guided vs p* per leaf")


def target(tree: ToyTree, weight) -> dict[tuple, float]:
    ref = tree.ref()
    unnorm = {y: p * weight(y) for y, p in ref.items()}
    z = sum(unnorm.values())
    return {y: v / z for y, v in unnorm.items()}


def bon_target(tree: ToyTree, n: int) -> dict[tuple, float]:
    """Best-of-N over texts, ties broken uniformly at random, by the order statistics of the
    leaf reward distribution (float64, no tilts code)."""
    ref = tree.ref()
    mass = {r: sum(p for y, p in ref.items() if tree.reward[y] == r) for r in tree.bins}
    below = {r: sum(m for r2, m in mass.items() if r2 < r) for r in tree.bins}
    return {y: p * ((below[r] + mass[r]) ** n - below[r] ** n) / mass[r]
            for y, p in ref.items() for r in [tree.reward[y]]}


def bon_brute_force(tree: ToyTree, n: int) -> dict[tuple, float]:
    """Best-of-N by enumerating every n-tuple of texts (ties split evenly): the definition."""
    ref = tree.ref()
    out = dict.fromkeys(ref, 0.0)
    for tup in itertools.product(tree.leaves, repeat=n):
        p = math.prod(ref[y] for y in tup)
        best = max(tree.reward[y] for y in tup)
        winners = [y for y in tup if tree.reward[y] == best]
        for y in winners:
            out[y] += p / len(winners)
    return out


def max_diff(tree: ToyTree, policy, p_star: dict[tuple, float]) -> float:
    got = {y: float(tree.leaf_prob(y, policy)) for y in tree.leaves}
    assert abs(sum(got.values()) - 1.0) < 1e-9   # float64 sums of at most 625 terms
    return max(abs(got[y] - p_star[y]) for y in tree.leaves)


TREES = [(3, 3, 0), (4, 3, 1), (5, 3, 2), (3, 4, 3)]


@pytest.fixture(scope="module", params=TREES, ids=lambda t: f"V{t[0]}-T{t[1]}-seed{t[2]}")
def tree(request) -> ToyTree:
    return ToyTree(*request.param)


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_tilt_is_exact(tree, beta):
    p_star = target(tree, lambda y: math.exp(beta * tree.reward[y]))
    check_guided(tree, lambda bins, f32: tilts.tilt_log_weights(bins, torch.tensor([beta]))[0], p_star)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_is_exact(tree, n):
    root = torch.tensor(tree.dist(()), dtype=torch.float64)
    with np.errstate(divide="ignore"):
        prompt_logp = torch.log(root)[None]
    # float64 inside, then stored in float32: what the tracer charges is that one rounding
    log_w64 = tilts.bon_log_weights(prompt_logp, torch.tensor([float(n)]))[0].double()  # [O]
    # h = 1 at the prompt: E[w] = 1, i.e. the model's E[F^(N-1)] = 1/N
    tr = RoundingTracer()
    with tr:
        log_h = tilts.log_h(logp_of(tree.dist(()), tr), tr.rounded(log_w64))
    assert_within(log_h.detach(), torch.zeros(()), tr.bound(log_h), "log h at the prompt")
    check_guided(tree, lambda bins, f32: f32(log_w64), bon_target(tree, n))


def test_best_of_n_order_statistics_match_brute_force():
    tree = ToyTree(3, 2, 7)  # 9 texts: every 3-tuple of texts can be enumerated
    for n in (2, 3):   # two float64 computations of ~1e2 terms each: agree to ~1e-14
        exact, brute = bon_target(tree, n), bon_brute_force(tree, n)
        assert max(abs(exact[y] - brute[y]) for y in tree.leaves) < 1e-12


def test_threshold_is_exact(tree):
    tau = float(np.median(tree.bins))
    p_star = target(tree, lambda y: float(tree.reward[y] >= tau))
    check_guided(tree, lambda bins, f32: tilts.threshold_log_weights(bins, torch.tensor([tau]))[0], p_star)


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_mean_rule_is_not_the_tilt(tree, beta):
    """The paper's rule beta * (E[R|s∘a] - mean) with exact expectations, against the tilt."""
    p_star = target(tree, lambda y: math.exp(beta * tree.reward[y]))
    bins = torch.tensor(tree.bins, dtype=torch.float32)

    def policy(prefix: tuple) -> np.ndarray:
        l = torch.tensor(tree.logits[prefix], dtype=torch.float32)
        q = torch.stack([tilts.mean_value(logp_of(tree.dist(prefix + (a,))), bins)
                         for a in range(tree.vocab)])
        shift = tilts.mean_rule(q[None], torch.ones(1, tree.vocab, dtype=torch.bool),
                                torch.tensor([beta]))[0]
        return torch.softmax((l + shift).double(), -1).numpy()

    # 1e-3: four orders of magnitude above the float32 error of the exact rules (check_guided)
    assert max_diff(tree, policy, p_star) > 1e-3


def test_rest_mass_is_exact_by_conservation(tree):
    """With k < V the candidates get their own h and the rest one h_rest: the mass of the rest
    equals p*(rest | s) at every prefix, and inside the rest the split stays pi_ref's (each
    difference 0 within the float32 bound of the two guided computations)."""
    beta = 2.0
    log_w = lambda bins, f32: tilts.tilt_log_weights(bins, torch.tensor([beta]))[0]  # noqa: E731
    k = tree.vocab - 2
    tr = RoundingTracer()
    with tr:
        inputs = Inputs(tree, tr)
        guided = guided_exact(tree, log_w, top_k=k, tr=tr, inputs=inputs)
        exact = guided_exact(tree, log_w, tr=tr, inputs=inputs)
        gaps = []
        for d in range(tree.depth):
            for prefix in itertools.product(range(tree.vocab), repeat=d):
                g, e = guided(prefix), exact(prefix)
                cand = torch.tensor(tree.logits[prefix]).topk(k).indices
                rest = torch.tensor(np.setdiff1d(np.arange(tree.vocab), cand.numpy()))
                pi = torch.tensor(tree.pi(prefix), dtype=torch.float64)[rest]
                gaps += [g[cand] - e[cand], (g[rest].sum() - e[rest].sum())[None],
                         g[rest] / g[rest].sum() - pi / pi.sum()]
        gaps = torch.cat(gaps)
    assert_within(gaps.detach(), torch.zeros_like(gaps), tr.bound(gaps), "guided vs exact, per prefix")


def test_negative_rest_is_clamped_and_counted():
    """A prefix value below the candidates' (a noisy model) would make h_rest negative."""
    cand_logpi = torch.log(torch.tensor([[0.5, 0.3]]))      # rest has mass 0.2
    cand_lh = torch.log(torch.tensor([[2.0, 1.0]]))         # Σ pi h = 1.3 > h(s) = 1.0
    shift, rest, clamped = tilts.exact_shifts(
        cand_logpi, torch.ones(1, 2, dtype=torch.bool), cand_lh, torch.zeros(1),
        torch.tensor([math.log(5.0)]))
    assert bool(clamped[0])
    assert float(rest[0]) == 0.0                            # floor: the smallest candidate h = log 1 - 0
    assert torch.equal(shift, cand_lh)                      # log h - 0, in float64 and back: exact
    # and a consistent one is not clamped: h(s) = 1.5 leaves 0.2 for the rest, h_rest = 1
    tr = RoundingTracer()
    with tr:   # the same call on float64 shadows of its float32 inputs: log h_rest - log h(s)
        shift, rest, clamped = tilts.exact_shifts(
            torch.log(tr.rounded([[0.5, 0.3]])), torch.ones(1, 2, dtype=torch.bool),
            torch.log(tr.rounded([[2.0, 1.0]])), torch.log(tr.rounded([1.5])), torch.tensor([math.log(5.0)]))
    assert not bool(clamped[0])
    assert_within(rest.detach(), torch.tensor([math.log(1.0 / 1.5)]), tr.bound(rest), "rest shift")


def test_rest_keep_ignores_the_prefix_value_and_keeps_the_top_k_mass():
    """vas_rest "keep" on fresh random rows: the guided top-k mass is pi(C) whatever h(s) says,
    the candidates split it in proportion to pi h, the rest keeps pi_ref's split, nothing is
    clamped; and where the model is consistent with a rest that averages the candidates' h, it
    equals the conservation rule."""
    gen = torch.Generator().manual_seed(3)
    R, K, V = 6, 5, 12
    logits = torch.randn(R, V, generator=gen, dtype=torch.float64) * 2
    pi = torch.softmax(logits, -1)
    cand = logits.topk(K, -1).indices                                       # [R, K]
    lpi = torch.log(pi.gather(1, cand))
    lh = torch.randn(R, K, generator=gen, dtype=torch.float64)
    valid = torch.ones(R, K, dtype=torch.bool)
    noisy_prefix = torch.randn(R, generator=gen, dtype=torch.float64) * 3   # unrelated to lh
    keep = torch.ones(R, dtype=torch.bool)
    # float64 inputs (declared so), float64 inside exact_shifts, float32 shifts out: the tracer
    # charges that last rounding and the test's own float64 arithmetic
    tr = RoundingTracer()
    lpi, lh, noisy_prefix = (tr.declare(x.clone().requires_grad_(), torch.float64) for x in (lpi, lh, noisy_prefix))
    with tr:
        shift, rest, clamped = tilts.exact_shifts(lpi, valid, lh, noisy_prefix, torch.full((R,), 50.0), keep)
        guided = (logits + rest.double()[:, None]).scatter(1, cand, logits.gather(1, cand) + shift.double())
        q = torch.softmax(guided, -1)
        qc = q.gather(1, cand)
        w = pi.gather(1, cand) * lh.exp()
        rest_mask = torch.ones(R, V, dtype=torch.bool).scatter(1, cand, False)
        # consistent model: h(s) = Σ_C pi h + pi(rest) * mean_C(h) -> conservation gives the same
        mass_c = pi.gather(1, cand).sum(-1)
        consistent = torch.log(w.sum(-1) + (1 - mass_c) * (w.sum(-1) / mass_c))
        s_c, r_c, _ = tilts.exact_shifts(lpi, valid, lh, consistent, torch.full((R,), 50.0))
        s_k, r_k, _ = tilts.exact_shifts(lpi, valid, lh, consistent, torch.full((R,), 50.0), keep)
        gaps = torch.cat([
            qc.sum(-1) - pi.gather(1, cand).sum(-1),                           # the top-k mass is pi(C)
            (qc / qc.sum(-1, keepdim=True) - w / w.sum(-1, keepdim=True)).reshape(-1),  # split as pi h
            (torch.where(rest_mask, q, 0) / (1 - qc.sum(-1, keepdim=True))     # the rest: pi's split
             - torch.where(rest_mask, pi, 0) / (1 - mass_c[:, None])).reshape(-1),
            # under softmax only candidate-minus-rest matters (the rules pick different log h(s))
            ((s_c - r_c[:, None]) - (s_k - r_k[:, None])).reshape(-1)])
    assert not bool(clamped.any())
    assert_within(gaps.detach(), torch.zeros_like(gaps), tr.bound(gaps), "keep against its definition")


def test_bon_weights_on_fresh_random_distributions():
    """bon_log_weights against a direct loop in 80-digit decimal arithmetic, for random prompt
    distributions (some bins nearly empty, some C_b^N far below float range), and Σ p w = 1."""
    from decimal import Decimal, getcontext

    getcontext().prec = 80
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        O = int(torch.randint(2, 40, (1,), generator=gen))
        logits = torch.randn(O, generator=gen, dtype=torch.float64) * (1 + trial)
        p = torch.softmax(logits, -1)
        n = int(torch.randint(1, 200, (1,), generator=gen))
        tr = RoundingTracer()
        logp = tr.declare(torch.log(p).requires_grad_(), torch.float64)   # exact float64 input
        with tr:   # float64 inside, float32 out, then the test's float64 sum
            got = tilts.bon_log_weights(logp[None], torch.tensor([float(n)]))[0].double()
            mass = (p * got.exp()).sum()
        pd = [Decimal(float(x)) for x in p]
        total = sum(pd)
        pd = [x / total for x in pd]
        want, c = [], Decimal(0)
        for pb in pd:
            prev, c = c, c + pb
            want.append(float(((c ** n - prev ** n) / pb).ln()))
        bound = tr.bound(torch.cat([got, mass[None]]))
        assert_within(got.detach(), torch.tensor(want, dtype=torch.float64), bound[:-1], f"trial {trial}")
        assert_within(mass.detach(), torch.tensor(1.0, dtype=torch.float64), bound[-1], f"trial {trial}: Σ p w")
