"""VASProcessorV1 driven by hand-made BatchUpdates, and the penalties it emulates, on CPU.

- Parking: vLLM's V1 runner removes a request that is merely not scheduled for a step and
  re-adds it later with the same prompt and output lists; its cache must come back as it was
  (no catch-up forward), while finished or replaced requests give their slots back.
- Penalties: VAS re-weights the distribution after vLLM's penalties on both runners. On V1 the
  adapter's output, passed through vLLM's own V1 penalty code, must equal what Model Runner V2
  does: vLLM's penalties first, then VAS (the fp32 reference) on the penalised logits.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from fp_bounds import RoundingTracer, assert_within  # noqa: E402
from vas_bounded import BoundedReference, penalty_round_trip  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.ops.penalties import apply_all_penalties  # noqa: E402

from vas_vllm.penalties import Penalties, PenaltyState  # noqa: E402
from vas_vllm.processor_v1 import VASProcessorV1  # noqa: E402

VOCAB = 49152


def _vllm_config(gen, values, **vas) -> SimpleNamespace:
    return SimpleNamespace(
        additional_config={"vas": {"value_models": {k: str(v) for k, v in values.items()}, **vas}},
        speculative_config=None, cache_config=SimpleNamespace(kv_cache_memory_bytes=None),
        model_config=SimpleNamespace(tokenizer=str(gen), tokenizer_revision=None, trust_remote_code=False,
                                     get_vocab_size=lambda: VOCAB, max_model_len=128),
        scheduler_config=SimpleNamespace(max_num_seqs=4))


def _update(removed=(), added=(), moved=()) -> SimpleNamespace:
    return SimpleNamespace(removed=list(removed), added=list(added), moved=list(moved), batch_size=4)


def _stats(prompt: list[int], output: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output count [V], in prompt or output [V]) of one row."""
    count = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=VOCAB)[:VOCAB]
    seen = count > 0
    seen[prompt] = True
    return count, seen


def _vllm_penalties(logits, pens: list[Penalties], prompts, outputs) -> torch.Tensor:
    """vLLM's V1 sampler penalty step on a copy of logits [P, V]."""
    width = max(len(p) for p in prompts)
    prompt_t = torch.tensor([p + [VOCAB] * (width - len(p)) for p in prompts])
    col = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return apply_all_penalties(logits.clone(), prompt_t, col([p.presence for p in pens]),
                               col([p.frequency for p in pens]), col([p.repetition for p in pens]),
                               [list(o) for o in outputs])


def test_penalty_state_is_vllms_penalty_and_inverts_it():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(20):
        P = rng.randint(1, 4)
        pens = [Penalties(rng.choice([1.0, 0.7, 1.4]), rng.choice([0.0, 0.3, -0.2]), rng.choice([0.0, 0.5]))
                for _ in range(P)]
        prompts = [[rng.randrange(50) for _ in range(rng.randint(1, 6))] for _ in range(P)]
        outputs = [[rng.randrange(50) for _ in range(rng.randint(0, 8))] for _ in range(P)]
        logits = torch.randn(P, VOCAB) * 4
        logits[:, :50] = torch.randn(P, 50) * 4  # the tokens that repeat
        state = PenaltyState.build(pens, prompts, outputs, VOCAB, torch.device("cpu"))
        assert torch.equal(state.apply(logits), _vllm_penalties(logits, pens, prompts, outputs))
        shifted = state.apply(logits) + torch.randn(P, VOCAB) * 3   # any target, signs may flip
        got = state.apply(state.invert(shifted))
        for i, pen in enumerate(pens):   # P(P^-1(y)) = y up to its six roundings per token
            count, seen = _stats(prompts[i], outputs[i])
            y = shifted[i].double().requires_grad_()   # the float32 values: exact inputs
            tracer = RoundingTracer()
            with tracer:
                trip = penalty_round_trip(y, pen.repetition, pen.frequency, pen.presence, count, seen)
            assert_within(got[i], shifted[i], tracer.bound(trip, elementwise=True), f"row {i}")


def test_v1_with_penalties_means_what_model_runner_v2_means(vas_models):
    """V1 adapter, then vLLM's V1 penalties == vLLM's penalties, then VAS (V2's order)."""
    gen, values = vas_models
    ref = BoundedReference(values)
    proc = VASProcessorV1(_vllm_config(gen, values), torch.device("cpu"), False)
    rng = random.Random(1)
    torch.manual_seed(1)
    knobs = [dict(beta=2.0, top_k=6, models=["a"]), dict(beta=1.0, top_k=9, models=["a", "b"], weights=[1.0, -0.5]),
             dict(beta=3.0, top_k=5, models=["b"]), None]
    pens = [Penalties(1.3, 0.4, 0.2), Penalties(0.8, 0.0, 0.0), None, Penalties(1.2, 0.5, 0.5)]
    rows = []
    for i, (k, pen) in enumerate(zip(knobs, pens)):
        extra = {} if k is None else {"vas_beta": k["beta"], "vas_top_k": k["top_k"], "vas_model": k["models"],
                                      **({"vas_weights": k["weights"]} if "weights" in k else {})}
        p = pen or Penalties(1.0, 0.0, 0.0)
        params = SamplingParams(extra_args=extra, repetition_penalty=p.repetition,
                                frequency_penalty=p.frequency, presence_penalty=p.presence)
        prompt = [rng.randrange(3, 60) for _ in range(rng.randint(2, 8))]
        rows.append((i, params, prompt, [rng.randrange(3, 60) for _ in range(rng.randint(1, 6))]))
    proc.update_state(_update(added=rows))
    for step in range(3):
        logits = torch.randn(4, VOCAB) * 3
        # make repeated tokens likely candidates, so the penalties move the top-k
        for i, _, prompt, output in rows:
            logits[i, prompt + output] += 6.0
        got = proc.apply(logits.clone())
        all_pens = [p or Penalties(1.0, 0.0, 0.0) for p in pens]
        prompts, outputs = [r[2] for r in rows], [r[3] for r in rows]
        v1 = _vllm_penalties(got, all_pens, prompts, outputs)            # what V1's sampler does next
        first = _vllm_penalties(logits, all_pens, prompts, outputs)      # Model Runner V2's order
        for i, (k, pen) in enumerate(zip(knobs, all_pens)):
            if k is None:
                assert torch.equal(v1[i], first[i]), f"step {step}, row {i}: a row without VAS changed"
                continue
            trip = (pen.repetition, pen.frequency, pen.presence, *_stats(prompts[i], outputs[i]))
            want = ref.expected(first[i], prompts[i] + outputs[i], penalties=trip, **k)
            assert want.ill is None, want.ill   # the mean rule has no branch
            want.check(v1[i], f"step {step}, row {i}")
        assert torch.equal(got[3], logits[3]), "a row without VAS was changed"
        untouched = (got[0] - logits[0]) == 0
        assert untouched.sum() >= VOCAB - 6, "tokens VAS did not shift must keep their logits"
        for _, _, _, output in rows:
            output.append(rng.randrange(3, 60))  # vLLM appends to the same list


def test_an_unscheduled_request_keeps_its_cache_and_finished_ones_free_theirs(vas_models):
    gen, values = vas_models
    proc = VASProcessorV1(_vllm_config(gen, {"a": values["a"]}, max_concurrent=2), torch.device("cpu"), False)
    rt = proc.core.runtimes["a"]
    vas = SamplingParams(extra_args={"vas_beta": 1.0, "vas_top_k": 4})
    a = (vas, [5, 6, 7, 8, 9], [])
    b = (vas, [20, 21], [])
    proc.update_state(_update(added=[(0, *a), (1, *b)]))
    proc.apply(torch.randn(2, VOCAB))
    caught_up = rt.stats["extend_tokens"]
    assert caught_up == 5 + 2
    a[2].append(10)  # a's sample of this step
    proc.update_state(_update(removed=[0], moved=[(1, 0, "UNIDIRECTIONAL")]))  # a not scheduled
    proc.apply(torch.randn(1, VOCAB))
    assert proc.stats()["parked_rows"] == 1 and proc.core.slots_in_use() == {"a": 2}
    proc.update_state(_update(added=[(1, *a)]))  # a is back with the same lists
    proc.apply(torch.randn(2, VOCAB))
    stats = proc.stats()
    assert stats["resumed_cached"] == 1 and stats["parked_rows"] == 0, stats
    # a's cache was kept: only its newest token was new (at most one catch-up token)
    assert rt.stats["extend_tokens"] - caught_up <= 1, rt.stats
    # a request re-added with other lists (a preemption under async scheduling) starts afresh
    proc.update_state(_update(removed=[1]))
    proc.update_state(_update(added=[(1, vas, list(a[1]), list(a[2]))]))
    proc.apply(torch.randn(2, VOCAB))
    assert proc.stats()["resumed"] == 1 and proc.core.slots_in_use() == {"a": 2}
    proc.update_state(_update(removed=[0, 1]))  # everything finished: parked slots go back
    assert proc.stats()["parked_rows"] == 0 and proc.core.slots_in_use() == {"a": 0}
