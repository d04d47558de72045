"""The fused, cached value-model runtime against a full, uncached transformers forward.

Every value the runtime returns must equal `model.score(model.model(history + [a]).last_hidden_state[:, -1])`,
computed in float64, within the float32 error bound of that very computation (fp_bounds.py;
value_reference.Float64ValueModel: RUNTIME_SLACK x the first-order bound), whatever happened to
the batch: prompts of different lengths, commit-on-accept over many steps, sampled tokens outside
the candidates, re-admission, moves and swaps. The same holds for distributional heads (all O bin
logits), and for the outputs at each row's prefix (`prefix_outputs`) and at marked positions
(`marked_outputs`).
"""
from __future__ import annotations

import random

import pytest
import torch

from fp_bounds import assert_within
from value_reference import RUNTIME_SLACK, Float64ValueModel, make_tiny_value_model
from vas_vllm.runtime import (
    SequenceTooLongError, SlotsExhaustedError, ValueRuntime,
)

CONFIGS = {
    "gqa": dict(heads=4, kv_heads=2),
    "mha": dict(heads=4, kv_heads=4),
    "mqa-tied": dict(heads=4, kv_heads=1, tied=True),
    "rope-linear": dict(rope="linear"),
    "rope-llama3": dict(rope="llama3", head_dim=32),
    "dist-gqa": dict(heads=4, kv_heads=2, num_labels=5),
    "dist-mqa-tied": dict(heads=4, kv_heads=1, tied=True, num_labels=9),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    seed = sorted(CONFIGS).index(request.param)
    make_tiny_value_model(folder, seed=seed, **CONFIGS[request.param])
    return folder, Float64ValueModel(folder)


def runtime(folder, **kw) -> ValueRuntime:
    args = dict(max_slots=8, max_len=160, max_candidates=8, verify_tokens=True)
    return ValueRuntime.from_pretrained(folder, **{**args, **kw})


def check(rt, model: Float64ValueModel, slots, hists, cands, marks=None,
          pick: random.Random | None = None) -> torch.Tensor:
    """Score, then compare every row (or, with `pick`, each row with probability 1/2: the long
    fuzz loops, where a bookkeeping error stays in the cache and shows in every later step,
    and the bound's backward passes are most of the test's time) with the float64 reference."""
    values = rt.score(slots, hists, cands, marks)
    O = model.model.config.num_labels
    assert values.shape == (cands.shape if O == 1 else (*cands.shape, O)) and values.dtype == torch.float32
    prefix = rt.prefix_outputs(slots)                                     # [B, O]
    for b, hist in enumerate(hists):
        if pick is not None and pick.random() < 0.5:
            continue
        want, bound, want_prefix, bound_prefix = model.bounded(hist, cands[b].tolist())
        assert_within(values[b].view(want.shape), want, RUNTIME_SLACK * bound,
                      f"row {b} (history length {len(hist)})")
        assert_within(prefix[b], want_prefix, RUNTIME_SLACK * bound_prefix, f"prefix of row {b}")
    return values


def check_marked(got: torch.Tensor, model: Float64ValueModel, hist: list[int], position: int) -> None:
    _, _, want, bound = model.bounded(hist, [], position)
    assert_within(got, want, RUNTIME_SLACK * bound, f"marked output at {position}")


def random_candidates(rng: random.Random, rows: int, k: int, vocab: int) -> torch.Tensor:
    return torch.tensor([rng.sample(range(vocab), k) for _ in range(rows)])  # [B, K] distinct per row


def test_prompts_of_different_lengths_in_one_batch(tiny):
    folder, model = tiny
    rng = random.Random(0)
    # At most 16 tokens of a row and 32 padded tokens per catch-up forward: the 40-token prompt
    # takes three chunks and the first round of chunks two forwards.
    rt = runtime(folder, prefill_chunk=16, prefill_tokens=32)
    hists = [[rng.randrange(101) for _ in range(n)] for n in (1, 5, 17, 40)]
    slots = [rt.allocate() for _ in hists]
    check(rt, model, slots, hists, random_candidates(rng, 4, 7, 101))
    assert [rt.cached_len(s) for s in slots] == [1, 5, 17, 40]
    assert rt.stats["forwards"] == 2 + 1 + 1 + 1, rt.stats  # catch-up rounds of 2, 1, 1 forwards + scoring


def test_commit_on_accept_over_many_steps_with_outside_samples(tiny):
    folder, model = tiny
    rng = random.Random(1)
    rt = runtime(folder)
    hists = [[rng.randrange(101) for _ in range(n)] for n in (3, 11, 6)]
    slots = [rt.allocate() for _ in hists]
    outside = []  # per step, how many rows sampled outside their candidates
    pick = random.Random(11)
    for step in range(32):
        cands = random_candidates(rng, 3, 5, 101)
        check(rt, model, slots, hists, cands, pick=pick)
        outside.append(0)
        for b, hist in enumerate(hists):
            if rng.random() < 0.85:
                hist.append(cands[b, rng.randrange(5)].item())
            else:  # sampled outside the top-k: must fall back to catch-up
                hist.append(rng.choice(sorted(set(range(101)) - set(cands[b].tolist()))))
                outside[-1] += 1
    synced_outside = sum(outside[:-1])  # the last step's tokens were never synced
    assert synced_outside > 0
    # Every synced token is committed from the candidates or caught up: never both, never twice.
    assert rt.stats["commits"] == 3 * 31 - synced_outside
    assert rt.stats["extend_tokens"] == (3 + 11 + 6) + synced_outside


def test_readmitted_row_and_recycled_slot(tiny):
    folder, model = tiny
    rng = random.Random(2)
    rt = runtime(folder, max_slots=2)
    a = [rng.randrange(101) for _ in range(9)]
    b = [rng.randrange(101) for _ in range(4)]
    sa, sb = rt.allocate(), rt.allocate()
    cands = random_candidates(rng, 2, 6, 101)
    check(rt, model, [sa, sb], [a, b], cands)
    a.append(cands[0, 0].item())
    b.append(cands[1, 2].item())
    # Preempt a: its slot is freed and reused by b's re-admission; a comes back later elsewhere.
    rt.release(sa)
    rt.release(sb)
    sb2 = rt.allocate()
    check(rt, model, [sb2], [b], random_candidates(rng, 1, 6, 101))
    sa2 = rt.allocate()
    check(rt, model, [sa2, sb2], [a, b], random_candidates(rng, 2, 6, 101))
    with pytest.raises(SlotsExhaustedError, match="all 2 value-model cache slots are in use"):
        rt.allocate()


def test_moves_swaps_skips_and_joins_against_reference(tiny):
    folder, model = tiny
    rng = random.Random(3)
    rt = runtime(folder, max_slots=6)
    live: dict[int, list[int]] = {}  # slot -> history
    pick = random.Random(13)
    for step in range(40):
        if len(live) < 5 and rng.random() < 0.3:
            live[rt.allocate()] = [rng.randrange(101) for _ in range(rng.randrange(1, 20))]
        if live and rng.random() < 0.1:
            rt.release(rng.choice(sorted(live)))  # finished or preempted
            live = {s: h for s, h in live.items() if s in rt.cache.used_slots}
        order = [s for s in live if rng.random() < 0.8]  # some rows sit a step out
        rng.shuffle(order)  # rows move and swap between steps
        if not order:
            continue
        k = rng.randrange(1, 9)
        cands = random_candidates(rng, len(order), k, 101)
        check(rt, model, order, [live[s] for s in order], cands, pick=pick)
        for b, s in enumerate(order):
            live[s].append(cands[b, rng.randrange(k)].item() if rng.random() < 0.9 else rng.randrange(101))
    assert rt.stats["commits"] > 20


def test_errors_are_clear(tiny):
    folder, _ = tiny
    rt = runtime(folder, max_slots=2, max_len=10, max_candidates=4)
    s = rt.allocate()
    with pytest.raises(SequenceTooLongError, match="11 tokens exceeds .* max_len 10"):
        rt.score([s], [list(range(11))], torch.zeros((1, 2), dtype=torch.long))
    with pytest.raises(SequenceTooLongError, match="position 10"):
        rt.score([s], [list(range(10))], torch.zeros((1, 2), dtype=torch.long))
    with pytest.raises(ValueError, match="5 candidates per row exceed max_candidates 4"):
        rt.score([s], [[1]], torch.zeros((1, 5), dtype=torch.long))
    with pytest.raises(ValueError, match="a slot appears twice"):
        rt.score([s, s], [[1], [1]], torch.zeros((2, 2), dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 101\), found \[-1\]"):
        rt.score([s], [[1, 2, -1]], torch.zeros((1, 2), dtype=torch.long))
    with pytest.raises(ValueError, match="slot 1 is not allocated"):
        rt.score([1], [[1]], torch.zeros((1, 2), dtype=torch.long))


def test_history_that_stops_extending_the_cache_is_recomputed(tiny, caplog):
    folder, model = tiny
    rng = random.Random(4)
    rt = runtime(folder)
    s = rt.allocate()
    hist = [rng.randrange(101) for _ in range(12)]
    check(rt, model, [s], [hist], random_candidates(rng, 1, 4, 101))
    edited = hist[:5] + [(hist[5] + 1) % 101] + hist[6:]  # same length, one token changed
    with caplog.at_level("WARNING"):
        check(rt, model, [s], [edited], random_candidates(rng, 1, 4, 101))
    assert "no longer extends the cached tokens" in caplog.text
    shorter = edited[:7]
    check(rt, model, [s], [shorter], random_candidates(rng, 1, 4, 101))
    assert rt.cached_len(s) == 7


def test_marked_outputs_through_catch_up_chunks_and_commits(tiny):
    """A mark inside a chunked catch-up, at the last history token, and on an accepted candidate
    (committed, not recomputed): each equals the full forward at that position."""
    folder, model = tiny
    rng = random.Random(5)
    rt = runtime(folder, prefill_chunk=8, prefill_tokens=16)
    hists = [[rng.randrange(101) for _ in range(n)] for n in (30, 6, 13)]
    slots = [rt.allocate() for _ in hists]
    marks = [17, 5, 0]
    cands = random_candidates(rng, 3, 4, 101)
    check(rt, model, slots, hists, cands, marks)
    got = rt.marked_outputs(slots)
    for b, (hist, m) in enumerate(zip(hists, marks)):
        check_marked(got[b], model, hist, m)
    hists[0].append(cands[0, 1].item())                       # accepted: committed at position 30
    check(rt, model, slots[:1], hists[:1], random_candidates(rng, 1, 4, 101), [30])
    check_marked(rt.marked_outputs(slots[:1])[0], model, hists[0], 30)
    with pytest.raises(ValueError, match="mark 3 is outside the positions this sync computes"):
        rt.sync(slots[1:2], hists[1:2], [3])
    rt.release(slots[2])
    s = rt.allocate()
    with pytest.raises(ValueError, match="no marked output"):
        rt.marked_outputs([s])
