"""Value-model training on CUDA: bf16 steps make the loss fall, an interrupted run resumes from its
checkpoint to (nearly) the weights of an uninterrupted one, the saved model reloads and scores
like the trained weights, and the memory estimate (memory.py) matches the measured peak. With two
GPUs or more: DDP (NCCL) and FSDP give the one-GPU model.

Skipped where there is no CUDA device (CI and the CPU machines). Self-contained (no vLLM, no
embedded model: the GPU host has torch, transformers, peft and accelerate only): a random Llama
generator with a word-level tokenizer built here. Run on a GPU host with
    python -m pytest -q tests/test_train_cuda.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("accelerate")

VOCAB, DEVICE = 2048, "cuda"


def make_generator(out: Path, *, hidden: int = 256, layers: int = 4) -> Path:
    """A random Llama generator with a word-level tokenizer of VOCAB tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def good_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0 if "w7" in r.split() else -1.0 for r in responses]


def write_dataset(out: Path, generator: Path, *, prompts: int = 48, samples: int = 4,
                  max_response: int = 24) -> Path:
    """Random samples; a response that holds token 7 is good (reward +1), else -1."""
    from value_models.training.rewards import score_dataset

    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps({
        "format": 1, "generator": str(generator), "prompts": "random", "num_prompts": prompts,
        "prompts_sha256": "0", "sampling": {"num_samples": samples}}))
    with open(out / "samples.jsonl", "w") as fh:
        for pid in range(prompts):
            p = [rng.randrange(8, VOCAB) for _ in range(rng.randint(2, 12))]
            for j in range(samples):
                r = [rng.randrange(8, VOCAB) for _ in range(rng.randint(2, max_response))]
                if rng.random() < 0.5:
                    r[rng.randrange(len(r))] = 7
                fh.write(json.dumps({"prompt_id": pid, "prompt": " ".join(f"w{t}" for t in p),
                                     "sample": j, "response": " ".join(f"w{t}" for t in r),
                                     "prompt_token_ids": p, "response_token_ids": r,
                                     "finish_reason": "length"}) + "\n")
    score_dataset(out, "py:test_train_cuda:good_reward")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cuda-train")
    gen = make_generator(root / "generator")
    return gen, write_dataset(root / "data", gen)


def config(data: Path, out: Path, **kw: object):
    from value_models.training.train_config import TrainConfig

    base = dict(data=str(data), out=str(out), reward="py:test_train_cuda:good_reward",
                value_layers=2, epochs=3, batch_size=16, lr=1e-3, lora_r=8, lora_alpha=16,
                val_fraction=0.2, checkpoint_every=2, seed=0, precision="bf16", device=DEVICE)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bf16_training_on_cuda_learns_resumes_and_reloads(setup, tmp_path: Path, lora: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaForSequenceClassification

    from value_models.compat import check_compatible
    from value_models.metadata import VASMetadata
    from value_models.training import trainer

    gen, data = setup
    whole = trainer.train_value_model(config(data, tmp_path / "whole", lora=lora))
    hist = VASMetadata.load(whole).training["history"]
    assert hist[-1]["train_loss"] < 0.8 * hist[1]["train_loss"], hist
    check_compatible(whole, gen)

    real, calls = trainer.optimizer_step, []

    def flaky(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 7:  # mid-epoch 1 (10 steps per epoch), after the checkpoint of step 6
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(trainer, "optimizer_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_value_model(config(data, tmp_path / "cut", lora=lora))
    monkeypatch.setattr(trainer, "optimizer_step", real)
    resumed = trainer.train_value_model(config(data, tmp_path / "cut", lora=lora))
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:  # GPU kernels need not be bitwise deterministic; bf16 autocast rounds
        torch.testing.assert_close(b[name], a[name], atol=2e-3, rtol=2e-2, msg=name)

    model = LlamaForSequenceClassification.from_pretrained(whole, dtype=torch.float32).to(DEVICE)
    ids = torch.tensor([[5, 9, 7, 11]], device=DEVICE)
    with torch.no_grad():
        v = model.score(model.model(ids).last_hidden_state)[0, :, 0]                 # [L]
    assert torch.isfinite(v).all() and float(v.abs().max()) > 1e-3


def test_memory_estimate_matches_the_measured_peak(tmp_path: Path) -> None:
    """One optimizer step at a real width (TinyLlama's layer shapes, 4 layers): the peak CUDA
    memory the step allocates beyond the weights is within 30 % of the estimate."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from value_models.training.engine import PositionValues
    from value_models.training.memory import SHAPES, estimate_training_memory

    shapes = dict(SHAPES["tinyllama-1.1b"], num_hidden_layers=4)
    B, L = 4, 512
    torch.manual_seed(0)
    net = LlamaForSequenceClassification(LlamaConfig(num_labels=1, pad_token_id=0, **shapes))
    model = PositionValues(net).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, 32000, (B, L), device=DEVICE)
    for _ in range(2):  # the second step has Adam's state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    est = estimate_training_memory(shapes, lora=False, micro_batch=B, seq_len=L)
    expected = est["total"] - est["overhead"]
    print(json.dumps({"measured_peak_gib": peak, "estimate": est}))
    assert peak == pytest.approx(expected, rel=0.3), (peak, est)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_gpus_equal_one(setup, tmp_path: Path, distributed: str) -> None:
    from safetensors.torch import load_file

    from value_models.training import trainer

    _, data = setup
    one = trainer.train_value_model(config(data, tmp_path / "one", lora=False, grad_accum=2,
                                           batch_size=8, epochs=1, precision="fp32"))
    two = trainer.train_value_model(config(data, tmp_path / "two", lora=False, batch_size=8,
                                           epochs=1, precision="fp32", num_processes=2,
                                           distributed=distributed))
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in a:
        # not derived: a training run's weights amplify a different summation order through
        # the optimizer; a regression check on GPU (where kernels are not bitwise reproducible)
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3, msg=name)
