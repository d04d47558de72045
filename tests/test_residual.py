"""Residual value models, V(s) = r(s) + U(s): the plugin's mean rule and the search use V exactly
(U from a full forward plus the reward of each candidate's text), the metadata and the trainer
carry the parametrisation, and a reward that cannot score a partial text is refused at start-up.

The reward here is `py:residual_reward:score` (tests/residual_reward.py), a deterministic function
of the text that differs between candidates, so a missing or misplaced r term shows."""
from __future__ import annotations

import asyncio
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from value_models.metadata import VASMetadata
from vas_vllm.core import History, VASCore

REWARD = "py:residual_reward:score"


def _vllm_config(gen, values: dict) -> SimpleNamespace:
    return SimpleNamespace(
        additional_config={"vas": {"value_models": {k: str(v) for k, v in values.items()}}},
        speculative_config=None, cache_config=SimpleNamespace(kv_cache_memory_bytes=None),
        model_config=SimpleNamespace(tokenizer=str(gen), tokenizer_revision=None, trust_remote_code=False,
                                     get_vocab_size=lambda: 49152, max_model_len=64),
        scheduler_config=SimpleNamespace(max_num_seqs=4))


@pytest.fixture(scope="module")
def residual_model(vas_models, tmp_path_factory):
    """vas_models' value model "a" (random head), marked residual on REWARD, standardised."""
    gen, values = vas_models
    folder = tmp_path_factory.mktemp("residual") / "a-residual"
    shutil.copytree(values["a"], folder)
    meta = VASMetadata.load(folder)
    meta.reward, meta.reward_normalization = REWARD, {"mean": 0.3, "std": 0.5}
    meta.value_parametrization = "residual"
    meta.save(folder)
    return gen, values["a"], folder


def _r(tok, prompt_ids, response_ids) -> float:
    import residual_reward

    return residual_reward.score([tok.decode(prompt_ids, skip_special_tokens=False)],
                                 [tok.decode(response_ids, skip_special_tokens=False)])[0]


def test_metadata_requires_a_scalar_head_and_a_reward():
    base = dict(generator_vocab_size=10, tokenizer_fingerprint="x", value_parametrization="residual")
    assert VASMetadata(**base, reward="vader_positive").residual
    with pytest.raises(ValueError, match="residual"):
        VASMetadata(**base)
    with pytest.raises(ValueError, match="residual"):
        VASMetadata(**base, reward="r", value_head="distributional", bins=[0.0, 1.0])
    with pytest.raises(ValueError, match="residual"):
        VASMetadata(**base, reward="r", reward_transform="bon_log_cdf")


def test_the_mean_rule_uses_v_equal_r_plus_u(residual_model):
    """V(s∘a) = U(s∘a) + (r(text of s∘a) - mean) / std in the plugin's units, for every candidate."""
    from transformers import AutoTokenizer

    from fp_bounds import U32, assert_within
    from value_reference import RUNTIME_SLACK, Float64ValueModel

    gen, plain, folder = residual_model
    tok = AutoTokenizer.from_pretrained(gen)
    core = VASCore.from_vllm_config(_vllm_config(gen, {"res": folder, "plain": plain}), "cpu")
    ref = Float64ValueModel(folder)
    rng = np.random.default_rng(0)
    for step in range(3):
        prompt, output = [int(x) for x in rng.integers(100, 40000, 4)], [int(x) for x in rng.integers(100, 40000, step)]
        logits = torch.randn(2, 49152) * 3
        req_res = core.request({"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "res"})
        req_plain = core.request({"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "plain"})  # beside it
        hist = History(prompt, output)
        out = core.apply(logits.clone(), [0, 1], [req_res, req_plain], [hist, hist], [4, 4])
        cand = logits[0].topk(5).indices
        u, bu, _, _ = ref.bounded(prompt + output, cand.tolist(), None)               # [K, 1] float64
        u, bu = u[:, 0], RUNTIME_SLACK * bu[:, 0]
        r = torch.tensor([(_r(tok, prompt, output + [a]) - 0.3) / 0.5 for a in cand.tolist()], dtype=torch.float64)
        v = u + r
        want = logits[0, cand].double() + 2.0 * (v - v.mean())
        # the bound: U's (derived, fp_bounds) through beta (q - mean q), r's float32 storage (one
        # rounding each, twice through the centring), and the few float32 roundings of the add,
        # the centring and the final logit
        bound = (2.0 * (bu + bu.mean()) + 2.0 * 2 * U32 * r.abs().max()
                 + 4 * U32 * (want.abs() + 2.0 * v.abs().max()))
        assert_within(out[0, cand], want, bound, f"step {step}")
        # the r term matters: without it the row would be the plain model's rule
        assert (2.0 * (r - r.mean())).abs().max() > 0.1
        core.release(req_res)
        core.release(req_plain)


def test_a_reward_that_cannot_score_partial_text_is_refused_at_start_up(residual_model, tmp_path):
    gen, _, folder = residual_model
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    meta = VASMetadata.load(bad)
    meta.reward = "py:residual_reward:final_only"
    meta.save(bad)
    with pytest.raises(ValueError, match="cannot score a partial text"):
        VASCore.from_vllm_config(_vllm_config(gen, {"bad": bad}), "cpu")


def test_the_search_scores_residual_models_as_r_plus_u(residual_model):
    from transformers import AutoTokenizer

    from value_reference import RUNTIME_SLACK, Float64ValueModel
    from vas_vllm.search.engine import SearchEngine
    from vas_vllm.search.rules import Particle
    from vas_vllm.search.scorers import SearchScorer

    gen, _, folder = residual_model
    tok = AutoTokenizer.from_pretrained(gen)
    engine = SearchEngine(tok, value_models={"res": str(folder)}, max_slots=8, max_len=64)
    knobs = engine.parse({"search_scorer": "res", "search_final": "scorer"}, 8)
    prompt = [101, 202, 303]
    scorer = SearchScorer(knobs, [tok.decode(prompt)], [prompt], tok, {"res": engine._scorer("res")})
    parts = [Particle(1, 0, [404, 505]), Particle(2, 0, [606])]
    got = asyncio.run(scorer.score(parts, 1))
    ref = Float64ValueModel(folder)
    for p, g in zip(parts, got):
        _, _, u, bound = ref.bounded(prompt + p.tokens, [], -1)
        want = (float(u[0]) + (_r(tok, prompt, p.tokens) - 0.3) / 0.5) * 0.5 + 0.3   # reward units
        # U's float32 bound (derived) in reward units; the rest is float64
        assert abs(g - want) <= RUNTIME_SLACK * float(bound[0]) * 0.5 + 1e-12, (g, want)
    scorer.close()


def test_training_fits_v_equal_r_plus_u_and_records_it(tmp_path, tiny_pair):
    """With the head at zero (U = 0) the residual model's loss is that of r(s_t) against the
    returns, computed here by a direct loop; a short run saves a model whose vas.json says residual."""
    from dataset_helpers import write_fake_dataset
    from value_models.training import trainer
    from value_models.training.rewards import score_dataset
    from value_models.training.train_config import TrainConfig

    graded = "py:dataset_helpers:graded_reward"
    gen, _ = tiny_pair
    data = write_fake_dataset(tmp_path / "d", num_prompts=8, generator=str(gen))
    score_dataset(data, graded)
    base = dict(data=str(data), reward=graded, value_layers=1, epochs=1, batch_size=8, lora=False,
                val_fraction=0.25, seed=0, lam=1.0)
    with pytest.raises(ValueError, match="residual"):
        TrainConfig(**base, out=str(tmp_path / "x"), residual=True, head="distributional")
    cfg = TrainConfig(**base, out=str(tmp_path / "m"), residual=True)
    meta, train, _, norm = trainer.prepare_data(cfg)
    model = trainer.build_model(cfg, trainer._init_folder(cfg, meta["generator"]))
    with torch.no_grad():
        model.net.score.weight.zero_()
    batch = train[:8]
    got = trainer._eval_batch(cfg, model, batch, pad_id=2, bins=None)
    # direct loop: lambda = 1, so every state's target is the final (standardised) reward
    want = sum(0.5 * (r_t - e["reward"]) ** 2 for e in batch for r_t in e["prefix_rewards"])
    n = sum(len(e["prefix_rewards"]) for e in batch)
    assert got["n"] == n and got["td"] == pytest.approx(want, rel=1e-5)
    out = trainer.train_value_model(cfg)
    saved = VASMetadata.load(out)
    assert saved.residual and saved.reward == graded and saved.reward_normalization == norm


def test_args_model_is_the_mean_rule_on_the_partial_text_reward(vas_models, tmp_path):
    """benchmarks/args_baseline.build_args_model: a zero head on a residual model is ARGS, the mean
    rule with V = the standardised reward of each candidate's text; every other weight is kept."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from benchmarks.args_baseline import build_args_model
    from fp_bounds import U32, assert_within

    gen, values = vas_models
    base = tmp_path / "base"
    shutil.copytree(values["a"], base)
    meta = VASMetadata.load(base)
    meta.reward_normalization = {"mean": 0.3, "std": 0.5}
    meta.save(base)
    folder = build_args_model(base, tmp_path / "args", reward=REWARD)
    got, src = load_file(str(folder / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert got.keys() == src.keys()
    for k in got:
        assert torch.equal(got[k], torch.zeros_like(src[k]) if k.startswith("score.") else src[k]), k
    assert VASMetadata.load(folder).residual and VASMetadata.load(folder).reward == REWARD
    tok = AutoTokenizer.from_pretrained(gen)
    core = VASCore.from_vllm_config(_vllm_config(gen, {"args": folder}), "cpu")
    rng = np.random.default_rng(1)
    prompt, output = [int(x) for x in rng.integers(100, 40000, 4)], [int(x) for x in rng.integers(100, 40000, 2)]
    logits = torch.randn(1, 49152) * 3
    req = core.request({"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "args"})
    out = core.apply(logits.clone(), [0], [req], [History(prompt, output)], [4])
    cand = logits[0].topk(5).indices
    r = torch.tensor([(_r(tok, prompt, output + [a]) - 0.3) / 0.5 for a in cand.tolist()], dtype=torch.float64)
    want = logits[0, cand].double() + 2.0 * (r - r.mean())
    # U is exactly 0 (zero weights); r's float32 storage (one rounding each, twice through the
    # centring) and the few float32 roundings of the add, the centring and the final logit
    bound = 2.0 * 2 * U32 * r.abs().max() + 4 * U32 * (want.abs() + 2.0 * r.abs().max())
    assert_within(out[0, cand], want, bound, "args")
    assert (2.0 * (r - r.mean())).abs().max() > 0.1
    core.release(req)
