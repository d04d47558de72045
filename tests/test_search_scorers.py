"""Particle scoring for the search: cached value-model outputs equal a full recompute.

A particle's slot continues its parent's (ValueRuntime.fork + catch-up of its own tokens); the kept
child's cache is the next block's parent. Driven through the branching a search does (K children
per parent, several children of one parent in one batch, parents dropped after selection, SMC's
repeated parents), every output is compared with a full, uncached transformers forward of the
particle's text in float64, within the float32 error bound of that computation (fp_bounds.py,
value_reference.Float64ValueModel; RUNTIME_SLACK for the runtime's tiled attention).
"""
from __future__ import annotations

import asyncio
import itertools
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fp_bounds import assert_within
from value_reference import RUNTIME_SLACK, Float64ValueModel, make_tiny_value_model
from vas_vllm.runtime import ValueRuntime
from vas_vllm.search.knobs import Block, SearchKnobs
from vas_vllm.search.rules import Particle
from vas_vllm.search.scorers import SearchScorer, ValueModelScorer, expected_max


def _meta(bins=None, norm=None, transform="identity"):
    return SimpleNamespace(reward_transform=transform, value_head="distributional" if bins else "scalar",
                           bins=bins, reward_normalization=norm)


@pytest.fixture(scope="module", params=["scalar", "dist"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("search-" + request.param)
    labels = 1 if request.param == "scalar" else 5
    model = make_tiny_value_model(folder, seed=3, heads=4, kv_heads=2, num_labels=labels)
    return folder, model, labels


def test_cached_particle_outputs_equal_a_full_recompute(tiny):
    folder, model, labels = tiny
    rng = random.Random(0)
    K, P = 3, 4
    rt = ValueRuntime.from_pretrained(folder, max_slots=P * (2 * K + 1), max_len=96, max_candidates=1,
                                      prefill_chunk=8, prefill_tokens=24)
    vm = ValueModelScorer("v", rt, _meta(bins=[-1.0, -0.5, 0.0, 0.5, 1.0] if labels > 1 else None))
    ref = Float64ValueModel(folder)
    prompts = [[rng.randrange(101) for _ in range(rng.randint(1, 20))] for _ in range(P)]
    ids = itertools.count(1)
    parents = [Particle(next(ids), i, []) for i in range(P)]
    checked = 0
    for block in range(4):
        children = []
        for p in parents:
            # SMC: a parent resampled twice has two entries; both children continue its slot
            reps = 2 if block == 2 and p.prompt % 2 == 0 else 1
            for _ in range(reps * K):
                m = rng.randint(1, 9)
                children.append(Particle(next(ids), p.prompt, p.tokens + [rng.randrange(101) for _ in range(m)],
                                         parent=p.pid))
        rng.shuffle(children)  # children of one parent are not adjacent in the batch
        out = vm.outputs(prompts, children)                                  # [n, O]
        for c, o in zip(children, out):
            _, _, want, bound = ref.bounded(prompts[c.prompt] + c.tokens, [], -1)
            assert_within(o, want, RUNTIME_SLACK * bound, f"block {block}, particle {c.pid}")
            checked += 1
        # keep one child per prompt (a search's selection); the others' slots are given back
        parents = [rng.choice([c for c in children if c.prompt == i]) for i in range(P)]
        vm.retain(parents)
        assert len(vm.slots) == P and rt.num_free_slots == rt.cache.num_slots - P
    assert checked > 40 and rt.stats["forks"] > 0
    # every forward token was a particle's own new token: no prefix computed twice
    vm.retain([])
    assert rt.num_free_slots == rt.cache.num_slots


def test_values_are_in_reward_units():
    """A standardised scalar model is de-standardised; a distributional one gives its mean, and
    E[max of n] with search_value 'max'."""
    rt = SimpleNamespace(stats={"extend_tokens": 0})
    scalar = ValueModelScorer("s", rt, _meta(norm={"mean": 0.2, "std": 0.5}))
    scalar.outputs = lambda ids, ps: torch.tensor([[1.0], [-2.0]])        # type: ignore[method-assign]
    np.testing.assert_allclose(scalar.values([], [None, None]), [0.7, -0.8])
    bins = [-1.0, 0.0, 2.0]
    dist = ValueModelScorer("d", rt, _meta(bins=bins))
    logits = torch.tensor([[0.1, 0.5, -0.3]])
    dist.outputs = lambda ids, ps: logits                                  # type: ignore[method-assign]
    p = torch.softmax(logits.double(), -1)[0].numpy()
    np.testing.assert_allclose(dist.values([], [None]), [float(p @ np.array(bins))], rtol=1e-12)
    # E[max of 3] by enumerating the 27 outcomes
    brute = sum(p[a] * p[b] * p[c] * max(bins[a], bins[b], bins[c])
                for a in range(3) for b in range(3) for c in range(3))
    np.testing.assert_allclose(dist.values([], [None], "max", 3), [brute], rtol=1e-12)


def test_expected_max_of_one_is_the_mean_and_grows_with_n():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=20)                             # [20, 7]
    bins = np.linspace(-1, 1, 7)
    np.testing.assert_allclose(expected_max(probs, bins, 1), probs @ bins, rtol=1e-12, atol=1e-15)
    e = [expected_max(probs, bins, n) for n in (1, 2, 8, 64)]
    assert all((b >= a - 1e-12).all() for a, b in zip(e, e[1:]))
    assert (e[-1] <= bins.max() + 1e-12).all()


def test_models_of_a_transformed_reward_are_refused():
    with pytest.raises(ValueError, match="bon_log_cdf"):
        ValueModelScorer("b", SimpleNamespace(), _meta(transform="bon_log_cdf"))


def test_the_scorer_combines_value_and_partial_text_reward():
    """search_scorer ['reward', 'v'] with weights [1, 0.5]: r(partial text) + 0.5 V."""
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    class Reward:
        name = "len"

        def score(self, prompts, responses):
            return [len(p) + len(r) for p, r in zip(prompts, responses)]

    knobs = SearchKnobs(rule="best_of_k", blocks=(Block(2, 2),), particles=1, scorers=("reward", "v"),
                        weights=(1.0, 0.5), value_stat="mean", final_reward=True)
    vm = SimpleNamespace(values=lambda ids, ps, stat, rem: np.array([2.0 * len(p.tokens) for p in ps]),
                         extended=3, retain=lambda ps: None)
    sc = SearchScorer(knobs, ["ab"], [[1]], Tok(), {"v": vm}, Reward())
    parts = [Particle(1, 0, [5]), Particle(2, 0, [5, 66])]
    got = asyncio.run(sc.score(parts, 1))
    np.testing.assert_allclose(got, [len("ab") + 1 + 0.5 * 2, len("ab") + 4 + 0.5 * 4])
    assert sc.stats.reward_calls == 2 and sc.stats.value_tokens == 3
