"""The paper's recipe (value_models/training/recipes/paper_hh.yaml), checked the ways that run
without the hub: it parses into the three steps with the paper's settings, and the value-model
path it takes (a separate base LM sharing the generator's tokenizer, then `vas-vllm check`) works
on local stand-ins: a 32,000-token Llama-style SentencePiece tokenizer (mistral-common's, the
size and kind of Llama-2's), a generator config with Llama-2-7B's exact shapes (config only:
the check reads no weights) and a small base LM with that vocabulary. The memory estimate of
these shapes is in tests/test_memory.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from value_models.training.memory import SHAPES
from value_models.training.train_config import PipelineConfig, load_yaml

RECIPE = Path(__file__).resolve().parents[1] / "value_models" / "training" / "recipes" / "paper_hh.yaml"


def test_recipe_parses_with_the_paper_settings() -> None:
    cfg = PipelineConfig.model_validate(load_yaml(RECIPE))
    assert cfg.sample.generator == "meta-llama/Llama-2-7b-hf" and cfg.sample.prompts.startswith("hh:")
    assert (cfg.sample.temperature, cfg.sample.top_k, cfg.sample.top_p, cfg.sample.max_new_tokens) == (
        1.0, 0, 1.0, 100)
    assert cfg.score.reward.startswith("hf:OpenAssistant/reward-model-deberta-v3-large-v2:")
    assert "on=pair" in cfg.score.reward and "output=logit" in cfg.score.reward
    t = cfg.train
    assert t.data == cfg.sample.out and t.reward == cfg.score.reward
    assert t.value_base is not None and "TinyLlama" in t.value_base and t.value_layers is None
    assert (t.gamma, t.lam, t.passes_per_batch, t.lr, t.precision) == (1.0, 0.95, 2, 1.41e-5, "bf16")
    assert t.batch_size * t.grad_accum == 32  # the authors' batch on one process


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 32,000-token Llama-style SentencePiece tokenizer (<s> 1, </s> 2)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mistral-common (a vLLM dependency) ships the stand-in tokenizer")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(src.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": False}))
    out = tmp_path_factory.mktemp("llama-tokenizer")
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    tok.save_pretrained(out)
    return out


def _standin(out: Path, tokenizer: Path, shapes: dict, *, weights: bool) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shapes, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    if weights:
        LlamaForCausalLM(config).save_pretrained(out)
    else:
        config.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def test_base_value_model_and_check_on_stand_ins(llama_tokenizer: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from value_models.checkpoint import make_value_model
    from value_models.metadata import VASMetadata
    from vas_vllm.cli import main

    gen = _standin(tmp_path / "llama-2-7b", llama_tokenizer, SHAPES["llama-2-7b"], weights=False)
    small = dict(SHAPES["tinyllama-1.1b"], hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = _standin(tmp_path / "tinyllama", llama_tokenizer, small, weights=True)
    assert AutoConfig.from_pretrained(gen).hidden_size == 4096

    value = make_value_model(gen, tmp_path / "value", base=base, generator_name="meta-llama/Llama-2-7b-hf")
    meta = VASMetadata.load(value)
    assert meta.training["init"] == {"num_layers": 2, "head": "zeros", "base": str(base)}
    assert meta.generator_vocab_size == 32000 and AutoConfig.from_pretrained(value).hidden_size == 64
    assert main(["check", str(gen), str(value)]) == 0
    assert "ok:" in capsys.readouterr().out

    other = tmp_path / "other-bos"  # same vocabulary, another bos token: another fingerprint
    tok = AutoTokenizer.from_pretrained(llama_tokenizer)
    tok.bos_token = "</s>"
    tok.save_pretrained(other)
    AutoConfig.from_pretrained(base).save_pretrained(other)
    (other / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer \(fingerprint .*\) differs from generator"):
        make_value_model(gen, tmp_path / "bad", base=other)
    assert main(["check", str(other), str(value)]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err

    wide = _standin(tmp_path / "wide", llama_tokenizer, dict(small, vocab_size=32064), weights=True)
    with pytest.raises(ValueError, match=r"vocab_size 32064, generator .* has 32000"):
        make_value_model(gen, tmp_path / "bad2", base=wide)
