"""VASProcessorV2 driven on CPU through vLLM's real Model Runner V2 interface classes.

vLLM's MRV2 needs Triton and CUDA, so this test plays the model runner: it owns hand-built
request-state buffers (`all_token_ids`, lengths) wrapped in the real `LogitsProcRequestState`,
admits requests into recycled slots with `add_request`, prefills prompts in random chunks,
skips and reorders requests every step, preempts and re-admits them (possibly into another
slot), and calls `apply` with a real `LogitsContext`. Every processed row is compared with the
fp32 reference on the same (random) generator logits; rows without VAS must come back unchanged.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vas_reference import VASReference  # noqa: E402
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


@pytest.mark.parametrize("seed", [0, 1])
def test_v2_adapter_against_reference(vas_models, seed):
    gen, values = vas_models
    ref = VASReference(gen, values)
    slots = 5
    states = _req_states(slots)
    proc = VASProcessorV2(_vllm_config(gen, values, max_num_seqs=slots, default_beta=1.0), states)
    assert isinstance(proc, LogitsProcessor)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = lambda: rng.randrange(3, VOCAB)  # noqa: E731
    waiting = [dict(prompt=[tok() for _ in range(rng.randint(1, 20))], out=[],
                    knobs=rng.choice(KNOB_CHOICES), max_new=rng.randint(3, 12)) for _ in range(14)]
    running: dict[int, dict] = {}
    free = list(range(slots))
    checked = preempted = chunked = 0
    for step in range(200):
        if not waiting and not running:
            break
        while waiting and free and rng.random() < 0.7:  # admit (a recycled slot, any of them)
            r = waiting.pop(0)
            slot = free.pop(rng.randrange(len(free)))
            hist = r["prompt"] + r["out"]
            states.all_token_ids.gpu[slot, :len(hist)] = torch.tensor(hist, dtype=torch.int32)
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
        for i, s in enumerate(batch):
            r = running[s]
            hist = (r["prompt"] + r["out"])[:seq_lens[i]]
            bon_waits = (r["knobs"] is not None and r["knobs"][1].get("mode") == "bon"
                         and len(hist) < len(r["prompt"]))  # exact Best-of-N needs the whole prompt
            if r["knobs"] is None or bon_waits:
                assert torch.equal(out[i], logits[i]), f"step {step}: a plain row was changed"
            else:
                want = ref.reweight(logits[i], hist, prompt_len=len(r["prompt"]), **r["knobs"][1])
                shift = (want - logits[i]).nan_to_num(0.0, 0.0, 0.0).abs().max()  # beta * |Q - mean|
                # fp32 rounding of values of size ~shift (cached vs uncached, other kernels)
                torch.testing.assert_close(out[i], want, atol=3e-5 * (1 + float(shift)), rtol=0,
                                           msg=lambda m: f"step {step}, slot {s}, knobs {r['knobs'][0]}: {m}")
                checked += 1
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
    assert checked > 60 and preempted > 0 and chunked > 0, (checked, preempted, chunked)
    stats = proc.stats()
    assert stats["fallback_rows"] == 0
    # finished requests keep their slots until their request slot is reused (documented)
    assert sum(stats["slots_in_use"].values()) <= slots * 2


def test_v2_apply_returns_early_without_vas_rows(vas_models):
    gen, values = vas_models
    proc = VASProcessorV2(_vllm_config(gen, values, max_num_seqs=2), _req_states(2))
    assert proc.add_request(0, SamplingParams()) is False
    logits = torch.randn(1, VOCAB)
    idx = np.array([0], dtype=np.int32)
    ctx = LogitsContext(torch.from_numpy(idx), torch.from_numpy(idx), idx, torch.zeros(1),
                        torch.zeros(1), torch.zeros(1), np.array([1], dtype=np.int32))
    assert proc.apply(logits, ctx) is logits
