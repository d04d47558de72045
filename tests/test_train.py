"""TD(lambda) training on a tiny model: the loss falls, every trainable parameter moves, the
output is a loadable value-model checkpoint, its LoRA delta rebuilds it bitwise, and an
interrupted run resumes to the same weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataset_helpers import write_fake_dataset
from fp_bounds import assert_within
from value_reference import RUNTIME_SLACK, Float64ValueModel
from value_models.training import trainer
from value_models.compat import check_compatible
from value_models.delta import DELTA_FILENAME, apply_delta, load_delta
from value_models.metadata import VASMetadata
from value_models.training.rewards import score_dataset
from value_models.training.train_config import TrainConfig

REWARD = "py:dataset_helpers:good_reward"
GRADED = "py:dataset_helpers:graded_reward"


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory, tiny_pair) -> Path:
    gen, _ = tiny_pair
    data = write_fake_dataset(tmp_path_factory.mktemp("data") / "d", num_prompts=16, generator=str(gen))
    score_dataset(data, REWARD)
    score_dataset(data, GRADED)
    return data


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), reward=REWARD, value_layers=1, epochs=2, batch_size=8,
                lr=3e-3, lora_r=4, lora_alpha=8, val_fraction=0.25, checkpoint_every=2, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("lora,grad_accum,head", [(True, 1, {}), (False, 1, {}), (True, 2, {}),
                                                  (True, 1, {"head": "distributional", "lam": 0.9}),
                                                  (False, 1, {"head": "distributional", "lam": 1.0,
                                                              "freeze_embeddings": True})],
                         ids=["lora", "full", "lora-accum2", "dist-td-lora", "dist-mc-full-frozen-embeddings"])
def test_every_trainable_parameter_moves(scored_data: Path, tmp_path: Path, lora: bool,
                                         grad_accum: int, head: dict) -> None:
    cfg = config(scored_data, tmp_path / "m", lora=lora, grad_accum=grad_accum, **head,
                 **({"reward": GRADED, "num_bins": 6} if head else {}))
    meta, train, _, _ = trainer.prepare_data(cfg)
    bin_list = trainer.make_bins(cfg, [e["reward"] for e in train])
    bins = torch.tensor(bin_list) if bin_list else None
    init = trainer._init_folder(cfg, meta["generator"], bin_list)
    model = trainer.build_model(cfg, init)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if lora:
        assert all("lora_" in n or n.endswith("score.weight") for n in before), sorted(before)
    elif cfg.freeze_embeddings:
        assert not [n for n in before if n.endswith("embed_tokens.weight")], sorted(before)
        assert len(before) == len(list(model.parameters())) - 1
    else:
        assert len(before) == len(list(model.parameters()))
    opt = trainer._optimizer(cfg, model)
    micro = [[train[i:i + 8] for i in range(j, j + 8 * grad_accum, 8)] for j in range(0, 24, 8)]
    losses = [trainer.optimizer_step(cfg, model, opt, m, pad_id=2, bins=bins) for m in micro]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    frozen = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not frozen, f"expected every trainable parameter to move, these did not: {frozen}"


def test_train_saves_a_loadable_value_model(scored_data: Path, tmp_path: Path, tiny_pair) -> None:
    gen, _ = tiny_pair
    out = trainer.train_value_model(config(scored_data, tmp_path / "m", precision="bf16", epochs=3))
    meta = VASMetadata.load(out)
    hist = meta.training["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    # The training TD loss falls. (The validation losses of this 12-prompt toy set are logged
    # but not asserted: it is small enough to be memorised.)
    assert hist[3]["train_loss"] < 0.8 * hist[1]["train_loss"], hist
    assert all(h["val_loss"] is not None and h["val_loss"] >= 0 for h in hist), hist
    assert meta.reward == REWARD and meta.reward_transform == "identity"
    assert set(meta.reward_normalization) == {"mean", "std"}
    assert meta.training["lora"]["merged"] and meta.training["config"]["lam"] == 0.95
    assert not (out / ".checkpoint").exists() and not (out / ".init").exists()
    check_compatible(out, gen)

    # the delta + a fresh initialisation rebuild the saved weights bitwise
    from transformers import LlamaForSequenceClassification

    from value_models.checkpoint import make_value_model

    init = make_value_model(gen, tmp_path / "init", num_layers=1)
    rebuilt = LlamaForSequenceClassification.from_pretrained(init, dtype=torch.float32)
    delta, info = load_delta(out / DELTA_FILENAME)
    assert info == {"lora_r": 4, "lora_alpha": 8.0, "num_layers": 1}
    apply_delta(rebuilt, delta, lora_r=4, lora_alpha=8.0)
    saved = load_file(out / "model.safetensors")
    for name, p in rebuilt.state_dict().items():
        assert torch.equal(saved[name], p), name
    fresh = load_file(init / "model.safetensors")
    assert not torch.equal(saved["model.layers.0.mlp.down_proj.weight"],
                           fresh["model.layers.0.mlp.down_proj.weight"])

    # the runtime loads it and agrees with a plain forward
    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(out, max_slots=1, max_len=32, max_candidates=2)
    slot = rt.allocate()
    got = rt.score([slot], [[3000, 4000, 5000]], torch.tensor([[6000, 2]]))       # [1, 2]
    # the saved weights are rebuilt's (checked above): float64 forward, float32 error bound
    want, bound, _, _ = Float64ValueModel(out).bounded([3000, 4000, 5000], [6000, 2], None)
    assert_within(got[0], want[:, 0], RUNTIME_SLACK * bound[:, 0], "runtime vs plain forward")


def test_resume_after_interruption_gives_the_same_model(scored_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    whole = trainer.train_value_model(config(scored_data, tmp_path / "whole", epochs=2))
    real_step, calls = trainer.optimizer_step, []
    _, train, _, _ = trainer.prepare_data(config(scored_data, tmp_path / "whole"))
    steps_per_epoch = -(-len(train) // 8)
    assert steps_per_epoch >= 4

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == steps_per_epoch + 3:  # third step of epoch 2; checkpoint after its 2nd
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", flaky)
    cfg = config(scored_data, tmp_path / "cut", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_value_model(cfg)
    state = torch.load(tmp_path / "cut" / ".checkpoint" / "state.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    monkeypatch.setattr(trainer, "optimizer_step", real_step)
    resumed = trainer.train_value_model(cfg)
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:  # bitwise: the same ops on the same data, shapes and threads, in one process
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    ha = json.loads((whole / "vas.json").read_text())["training"]["history"]
    hb = json.loads((resumed / "vas.json").read_text())["training"]["history"]
    assert ha == hb

    # a changed setting refuses to resume
    monkeypatch.setattr(trainer, "optimizer_step", flaky)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        trainer.train_value_model(config(scored_data, tmp_path / "cut2", epochs=2))
    with pytest.raises(ValueError, match=r"lr: expected 0.001, found 0.003"):
        trainer.train_value_model(config(scored_data, tmp_path / "cut2", epochs=2, lr=1e-3))


def test_bon_transform_is_recorded(scored_data: Path, tmp_path: Path) -> None:
    out = trainer.train_value_model(config(scored_data, tmp_path / "m", epochs=1,
                                           reward_transform="bon_log_cdf"))
    meta = VASMetadata.load(out)
    assert meta.reward_transform == "bon_log_cdf" and meta.reward_normalization is None


def test_distributional_head_trains_calibrates_and_loads(scored_data: Path, tmp_path: Path,
                                                         tiny_pair) -> None:
    gen, _ = tiny_pair
    cfg = config(scored_data, tmp_path / "m", reward=GRADED, head="distributional", num_bins=8,
                 lam=1.0, passes_per_batch=1, epochs=3)
    out = trainer.train_value_model(cfg)
    meta = VASMetadata.load(out)
    _, train, _, _ = trainer.prepare_data(cfg)
    rewards = [e["reward"] for e in train]
    assert meta.value_head == "distributional" and 2 <= len(meta.bins) <= 8
    assert (meta.bins[0], meta.bins[-1]) == pytest.approx((min(rewards), max(rewards)))
    assert meta.reward_normalization is None and meta.training["algorithm"] == "distributional_monte_carlo"
    hist = meta.training["history"]
    assert hist[3]["train_loss"] < 0.9 * hist[1]["train_loss"], hist
    cal = hist[3]["val_calibration_last"]
    assert set(cal) >= {"crps", "pit", "pit_max_dev", "pearson_mean"} and len(cal["pit"]) == 10
    check_compatible(out, gen)

    from transformers import LlamaForSequenceClassification

    from value_models.checkpoint import make_value_model

    init = make_value_model(gen, tmp_path / "init", num_layers=1, bins=meta.bins)
    rebuilt = LlamaForSequenceClassification.from_pretrained(init, dtype=torch.float32)
    delta, info = load_delta(out / DELTA_FILENAME)
    apply_delta(rebuilt, delta, lora_r=info["lora_r"], lora_alpha=info["lora_alpha"])
    saved = load_file(out / "model.safetensors")
    for name, p in rebuilt.state_dict().items():
        assert torch.equal(saved[name], p), name

    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(out, max_slots=1, max_len=32, max_candidates=2)
    slot = rt.allocate()
    got = rt.score([slot], [[3000, 4000, 5000]], torch.tensor([[6000, 2]]))       # [1, 2, O]
    assert got.shape == (1, 2, len(meta.bins))
    want, bound, _, _ = Float64ValueModel(out).bounded([3000, 4000, 5000], [6000, 2], None)
    assert_within(got[0], want, RUNTIME_SLACK * bound, "runtime vs plain forward")


@pytest.mark.parametrize("kw, needle", [
    ({"head": "distributional", "reward_transform": "bon_log_cdf"}, "reward_transform must be identity"),
    ({"head": "distributional", "reward_normalization": "standardize"}, "bins are raw rewards"),
    ({"reward_transform": "bon_log_cdf", "reward_normalization": "standardize"}, "beta = N - 1"),
])
def test_inconsistent_heads_and_transforms_are_refused(tmp_path: Path, kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        config(tmp_path, tmp_path / "m", **kw)


def test_auxiliary_prefix_head_trains_and_is_not_saved(scored_data: Path, tmp_path: Path) -> None:
    """aux_prefix_weight > 0: prefix rewards are computed and cached (equal to scoring each
    prefix's decoded text directly), the training-only head moves, the saved model lacks it."""
    from transformers import AutoTokenizer

    from value_models.training.prefix_rewards import load_prefix_scores, prefix_scores_path, prefix_texts
    from value_models.training.rewards import parse_reward
    from value_models.training.sampling import load_samples

    meta, samples = load_samples(scored_data)
    got = load_prefix_scores(scored_data, GRADED, samples[:6], meta["generator"])
    tok = AutoTokenizer.from_pretrained(meta["generator"])
    rw = parse_reward(GRADED)
    for s, scores in zip(samples[:6], got):
        texts = prefix_texts(tok, s["response_token_ids"])
        assert texts[0] == "" and len(texts) == len(s["response_token_ids"])
        assert scores == rw.score([s["prompt"]] * len(texts), texts)
    assert prefix_scores_path(scored_data, GRADED).is_file()

    cfg = config(scored_data, tmp_path / "m", reward=GRADED, aux_prefix_weight=0.5, lora=False, epochs=1)
    _, train, _, _ = trainer.prepare_data(cfg)
    assert all(len(e["prefix_rewards"]) == len(e["response_ids"]) for e in train)
    init = trainer._init_folder(cfg, meta["generator"])
    model = trainer.build_model(cfg, init)
    head = getattr(model, trainer.AUX_HEAD)
    before = head.weight.detach().clone()
    opt = trainer._optimizer(cfg, model)
    loss = trainer.optimizer_step(cfg, model, opt, [train[:8]], pad_id=2)
    assert torch.isfinite(torch.tensor(loss)) and not torch.equal(before, head.weight)
    out = trainer.train_value_model(cfg)
    assert not any("aux" in k for k in load_file(out / "model.safetensors"))
    assert VASMetadata.load(out).training["config"]["aux_prefix_weight"] == 0.5


def test_keep_best_saves_the_epoch_with_the_lowest_validation_loss(
        scored_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keep_best: the saved weights are bitwise those of a run stopped at the best epoch (here
    epoch 2 of 3, by scripted validation losses), also when the run is interrupted in epoch 3
    and resumed; the history marks that epoch only. Without val_fraction it is refused."""
    real_entry, losses = trainer._val_entry, iter([3.0, 2.0, 1.0, 1.5] * 2)

    def scripted(*args, **kwargs):
        return {**real_entry(*args, **kwargs), "val_loss": next(losses)}

    ref = trainer.train_value_model(config(scored_data, tmp_path / "ref", epochs=2))
    monkeypatch.setattr(trainer, "_val_entry", scripted)
    real_step, calls = trainer.optimizer_step, []
    _, train, _, _ = trainer.prepare_data(config(scored_data, tmp_path / "ref"))
    steps_per_epoch = -(-len(train) // 8)

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * steps_per_epoch + 3:  # third step of epoch 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    cfg = config(scored_data, tmp_path / "best", epochs=3, keep_best=True)
    monkeypatch.setattr(trainer, "optimizer_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_value_model(cfg)
    monkeypatch.setattr(trainer, "optimizer_step", real_step)
    best = trainer.train_value_model(cfg)
    assert next(losses) == 3.0  # 4 evaluations: before training and after each of 3 epochs
    a, b = load_file(ref / "model.safetensors"), load_file(best / "model.safetensors")
    for name in a:  # bitwise: the same ops on the same data, shapes and threads, in one process
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    history = json.loads((best / "vas.json").read_text())["training"]["history"]
    assert [h["val_loss"] for h in history] == [3.0, 2.0, 1.0, 1.5]
    assert [h.get("kept", False) for h in history] == [False, False, True, False]
    with pytest.raises(ValueError, match="needs val_fraction > 0"):
        config(scored_data, tmp_path / "m", keep_best=True, val_fraction=0.0)
