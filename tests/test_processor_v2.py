"""VASProcessorV2 driven on CPU through vLLM's real Model Runner V2 interface classes.

vLLM's MRV2 needs Triton and CUDA, so this test plays the model runner: it owns hand-built
request-state buffers (`all_token_ids`, lengths) wrapped in the real `LogitsProcRequestState`,
admits requests into recycled slots with `add_request`, prefills prompts in random chunks,
skips and reorders requests every step, preempts and re-admits them (possibly into another
slot), lets them finish (MRV2 never says so: their slot index just stops appearing), and calls
`apply` with a real `LogitsContext`. Every processed row is compared with the float64 reference on
the same (random) generator logits, within the float32 error bound derived from that row's own
computation (vas_bounded.py); rows without VAS, and rows still in a partial prefill (whose
samples vLLM discards), must come back unchanged. With fewer value-model slots than requests, a
row may be sampled without VAS only while every slot of one of its models is held by rows of the
same step (finished or absent requests give theirs up).
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vas_bounded import BoundedReference  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import (  # noqa: E402
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from vas_vllm.processor_v2 import VASProcessorV2  # noqa: E402

VOCAB = 49152
MAX_LEN = 96


class _Buffer:
    """What vLLM's StagedWriteTensor / UvaBackedTensor expose to processors: .gpu and .np."""

    def __init__(self, t: torch.Tensor) -> None:
        self.gpu, self.np = t, t.numpy()


def _vllm_config(gen, values, *, max_num_seqs: int, **vas) -> SimpleNamespace:
    return SimpleNamespace(
        additional_config={"vas": {"value_models": {k: str(v) for k, v in values.items()}, **vas}},
        speculative_config=None,
        cache_config=SimpleNamespace(kv_cache_memory_bytes=None),
        model_config=SimpleNamespace(
            tokenizer=str(gen), tokenizer_revision=None, trust_remote_code=False,
            get_vocab_size=lambda: VOCAB, max_model_len=MAX_LEN),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
    )


def _req_states(slots: int) -> LogitsProcRequestState:
    z = lambda *shape: _Buffer(torch.zeros(shape, dtype=torch.int32))  # noqa: E731
    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=VOCAB,
        all_token_ids=z(slots, MAX_LEN), prompt_len=z(slots), prefill_len=z(slots), total_len=z(slots))


KNOB_CHOICES = [
    None,
    ({"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "a"}, dict(beta=2.0, top_k=5, models=["a"])),
    ({"vas_beta": 0.7, "vas_top_k": 9, "vas_model": "b"}, dict(beta=0.7, top_k=9, models=["b"])),
    ({"vas_beta": 3.0, "vas_top_k": 4, "vas_model": ["a", "b"], "vas_weights": [1.0, -0.5]},
     dict(beta=3.0, top_k=4, models=["a", "b"], weights=[1.0, -0.5])),
    ({"vas_top_k": 6, "vas_mask_outside_top_k": 1}, dict(beta=1.0, top_k=6, models=["a"], mask=True)),
    ({"vas_bon_n": 3, "vas_model": "bon"}, dict(beta=2.0, top_k=20, models=["bon"])),
    ({"vas_tilt": 2.0, "vas_top_k": 6, "vas_model": "dist"},
     dict(beta=2.0, top_k=6, models=["dist"], mode="tilt")),
    ({"vas_bon_n": 4, "vas_top_k": 5, "vas_model": "dist"},
     dict(beta=3.0, top_k=5, models=["dist"], mode="bon", bon_n=4)),
    ({"vas_threshold": 0.2, "vas_top_k": 4, "vas_model": "dist"},
     dict(beta=0.0, top_k=4, models=["dist"], mode="threshold", taus=[0.2])),
    ({"vas_bon_n": 3, "vas_top_k": 6, "vas_model": ["dist", "bon"], "vas_weights": [0.5, 1.0]},
     dict(beta=2.0, top_k=6, models=["dist", "bon"], weights=[0.5, 1.0], mode="bon", bon_n=3)),
]


@pytest.mark.parametrize("seed,max_concurrent", [(0, None), (1, None), (2, 2), (3, 1)])
def test_v2_adapter_against_reference(vas_models, seed, max_concurrent):
    gen, values = vas_models
    ref = BoundedReference(values)
    slots = 5
    states = _req_states(slots)
    vas = dict(default_beta=1.0) if max_concurrent is None else dict(default_beta=1.0, max_concurrent=max_concurrent)
    proc = VASProcessorV2(_vllm_config(gen, values, max_num_seqs=slots, **vas), states)
    assert isinstance(proc, LogitsProcessor)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = lambda: rng.randrange(3, VOCAB)  # noqa: E731
    waiting = [dict(prompt=[tok() for _ in range(rng.randint(1, 20))], out=[],
                    knobs=rng.choice(KNOB_CHOICES), max_new=rng.randint(3, 12)) for _ in range(14)]
    running: dict[int, dict] = {}
    free = list(range(slots))
    checked = preempted = chunked = fallbacks = skipped = ill = 0
    for step in range(200):
        if not waiting and not running:
            break
        while waiting and free and rng.random() < 0.7:  # admit (a recycled slot, any of them)
            r = waiting.pop(0)
            slot = free.pop(rng.randrange(len(free)))
            hist = r["prompt"] + r["out"]
            states.all_token_ids.gpu[slot, :len(hist)] = torch.tensor(hist, dtype=torch.int32)
            states.prefill_len.np[slot] = len(hist)  # prompt + output so far, fed in chunks
            states.prompt_len.np[slot] = len(r["prompt"])
            r["computed"], r["total"] = 0, len(hist)
            extra = r["knobs"][0] if r["knobs"] else {"unrelated": 1}
            assert proc.add_request(slot, SamplingParams(extra_args=extra)) == (r["knobs"] is not None)
            running[slot] = r
        batch = [s for s in running if rng.random() < 0.85]  # some requests sit this step out
        rng.shuffle(batch)
        if not batch:
            continue
        seq_lens = []
        for s in batch:
            r = running[s]
            if r["computed"] < r["total"]:  # (chunked) prefill
                r["computed"] = min(r["total"], r["computed"] + rng.randint(1, 12))
                chunked += r["computed"] < r["total"]
            seq_lens.append(r["computed"])
        idx = np.array(batch, dtype=np.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.from_numpy(idx), idx_mapping=torch.from_numpy(idx),
            idx_mapping_np=idx, expanded_local_pos=torch.zeros(len(batch), dtype=torch.int32),
            input_ids=torch.zeros(len(batch), dtype=torch.int32),
            pos=torch.tensor(seq_lens, dtype=torch.int32) - 1,
            seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32))
        logits = torch.randn(len(batch), VOCAB) * 3.0
        out = proc.apply(logits.clone(), ctx)
        scored: dict[str, int] = {}  # per value model, rows of this step re-weighted with it
        fell_back = []
        for i, s in enumerate(batch):
            r = running[s]
            hist = (r["prompt"] + r["out"])[:seq_lens[i]]
            # a row still in (chunked) prefill is not scored: vLLM discards its sample (this also
            # covers exact Best-of-N, which needs the whole prompt)
            if r["knobs"] is None or r["computed"] < r["total"]:
                assert torch.equal(out[i], logits[i]), f"step {step}: a plain or prefilling row was changed"
                skipped += r["knobs"] is not None
            elif torch.equal(out[i], logits[i]):
                fell_back.append(r["knobs"][1]["models"])
            else:
                want = ref.expected(logits[i], hist, prompt_len=len(r["prompt"]), **r["knobs"][1])
                want.check(out[i], f"step {step}, slot {s}, knobs {r['knobs'][0]}")
                ill += want.ill is not None   # a clamp or cap decided within rounding: not checked
                checked += 1
                for m in r["knobs"][1]["models"]:
                    scored[m] = scored.get(m, 0) + 1
        for models in fell_back:  # only when rows of this very step hold every slot of a model
            assert max_concurrent is not None and any(scored.get(m, 0) == max_concurrent for m in models), (
                f"step {step}: a row using {models} was sampled without VAS while this step's rows "
                f"held only {scored} of {max_concurrent} slots per model")
        fallbacks += len(fell_back)
        for i, s in enumerate(batch):
            r = running[s]
            if r["computed"] < r["total"]:
                continue  # a partial prefill's sample is discarded
            t = int(torch.multinomial(torch.softmax(out[i], -1), 1))
            r["out"].append(t)
            states.all_token_ids.gpu[s, r["total"]] = t
            r["total"] += 1
            r["computed"] = r["total"]
        for s in list(running):
            r = running[s]
            if len(r["out"]) >= r["max_new"]:
                del running[s]
                free.append(s)
            elif rng.random() < 0.06:  # preempted: vLLM frees the slot; re-admitted later
                del running[s]
                free.append(s)
                waiting.append(r)
                preempted += 1
    assert not waiting and not running, "the simulation did not finish"
    assert checked > 60 and preempted > 0 and chunked > 0 and skipped > 0, (checked, preempted, chunked, skipped)
    assert ill <= checked // 20, f"{ill} of {checked} rows had a branch decided within rounding"
    stats = proc.stats()
    assert stats["fallback_rows"] == fallbacks and stats["prefill_rows_skipped"] == skipped, stats
    if max_concurrent is None:
        assert fallbacks == 0
    assert stats["rows_scored"] == checked and stats["active_rows"] <= slots
    assert all(0 <= n <= (max_concurrent or slots) for n in stats["slots_in_use"].values()), stats


def test_v2_apply_returns_early_without_vas_rows(vas_models):
    gen, values = vas_models
    proc = VASProcessorV2(_vllm_config(gen, values, max_num_seqs=2), _req_states(2))
    assert proc.add_request(0, SamplingParams()) is False
    logits = torch.randn(1, VOCAB)
    idx = np.array([0], dtype=np.int32)
    ctx = LogitsContext(torch.from_numpy(idx), torch.from_numpy(idx), idx, torch.zeros(1),
                        torch.zeros(1), torch.zeros(1), np.array([1], dtype=np.int32))
    assert proc.apply(logits, ctx) is logits


def _step(proc, states, batch: list[int], seq_lens: list[int], logits: torch.Tensor) -> torch.Tensor:
    idx = np.array(batch, dtype=np.int32)
    ctx = LogitsContext(
        expanded_idx_mapping=torch.from_numpy(idx), idx_mapping=torch.from_numpy(idx), idx_mapping_np=idx,
        expanded_local_pos=torch.zeros(len(batch), dtype=torch.int32),
        input_ids=torch.zeros(len(batch), dtype=torch.int32),
        pos=torch.tensor(seq_lens, dtype=torch.int32) - 1, seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32))
    return proc.apply(logits.clone(), ctx)


def test_a_finished_request_gives_its_slot_to_one_that_waits(vas_models):
    """The issue's scenario: max_num_seqs 4, max_concurrent 1. A takes the slot and B is sampled
    without VAS; A finishes (its request slot simply stops appearing); B gets VAS at once, exact."""
    gen, values = vas_models
    ref = BoundedReference(values)
    states = _req_states(4)
    proc = VASProcessorV2(_vllm_config(gen, values, max_num_seqs=4, max_concurrent=1), states)
    knobs = {"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "a"}
    hists = {0: [11, 12, 13], 1: [21, 22]}  # request slot -> history (A at 0, B at 1)
    for slot, hist in hists.items():
        states.all_token_ids.gpu[slot, :len(hist)] = torch.tensor(hist, dtype=torch.int32)
        states.prefill_len.np[slot] = len(hist)
        assert proc.add_request(slot, SamplingParams(extra_args=knobs))
    logits = torch.randn(2, VOCAB) * 3.0
    out = _step(proc, states, [0, 1], [3, 2], logits)
    assert not torch.equal(out[0], logits[0]) and torch.equal(out[1], logits[1])  # B: no slot
    for t in range(3):  # A has finished: only B is scheduled from now on
        hist = hists[1]
        logits = torch.randn(1, VOCAB) * 3.0
        out = _step(proc, states, [1], [len(hist)], logits)
        ref.expected(logits[0], hist, beta=2.0, top_k=5, models=["a"]).check(out[0], f"step {t}")
        hist.append(int(out[0].argmax()))
        states.all_token_ids.gpu[1, len(hist) - 1] = hist[-1]
    stats = proc.stats()
    assert (stats["fallback_rows"], stats["evicted"], stats["active_rows"]) == (1, 1, 1), stats
    assert stats["slots_in_use"]["a"] == 1 and sum(stats["slots_in_use"].values()) == 1, stats
