"""make_value_model: loadable by plain transformers, weights copied, zero head, V at the last
position, the pooled-output trap; resolve_model_path offline; tokenizer fingerprints."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForSequenceClassification,
)

from value_models import (
    VASMetadata,
    load_value_model_metadata,
    make_value_model,
    resolve_model_path,
    tokenizer_fingerprint,
)

PAD = 2  # SmolLM2: pad == eos == <|im_end|>


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49152, (1, n), generator=g)  # [1, T], ids 0..2 are specials/pad
    return ids


def _last_position_value(model: LlamaForSequenceClassification, ids: torch.Tensor) -> torch.Tensor:
    # V(prefix) = score(h[:, -1]): the reference that does not depend on pad_token_id.
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, T, D]
    return model.score(hidden[:, -1]).squeeze(-1)  # [B]


def test_loads_with_auto_class(tiny_pair: tuple[Path, Path]) -> None:
    _, value_dir = tiny_pair
    model = AutoModelForSequenceClassification.from_pretrained(value_dir)
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.num_labels == 1 and model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.config.pad_token_id == PAD
    assert model.score.weight.shape == (1, 64)
    assert torch.count_nonzero(model.score.weight) == 0
    meta = load_value_model_metadata(value_dir)
    assert meta.generator_vocab_size == 49152 and meta.generator == str(tiny_pair[0])
    assert (value_dir / "tokenizer.json").is_file()


def test_backbone_weights_are_the_generators(tiny_pair: tuple[Path, Path]) -> None:
    gen_dir, value_dir = tiny_pair
    gen = load_file(gen_dir / "model.safetensors")
    value = load_file(value_dir / "model.safetensors")
    # embeddings, layer 0 and the final norm (not layer 1, not a tied lm_head) + the head
    expected = {k for k in gen if k.startswith("model.") and not k.startswith("model.layers.1.")}
    assert set(value) == expected | {"score.weight"}, sorted(value)
    for key, tensor in value.items():
        if key != "score.weight":
            torch.testing.assert_close(tensor, gen[key], rtol=0, atol=0, msg=key)  # copied weights: bitwise


def test_value_at_last_position_and_pooled_trap(tiny_pair: tuple[Path, Path]) -> None:
    _, value_dir = tiny_pair
    model = AutoModelForSequenceClassification.from_pretrained(value_dir).eval()
    ids = _ids(7)
    with torch.no_grad():
        assert torch.equal(_last_position_value(model, ids), torch.zeros(1))  # fresh zero head
        model.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        v = _last_position_value(model, ids)
        assert v.abs().item() > 1e-3, v  # a random head: O(1), far from a zero head's exact 0
        # No pad id in `ids`: HF's pooled output is the last position, as it should be (the same
        # forward, only pooled differently: torch's float32 defaults are far above its rounding).
        torch.testing.assert_close(model(input_ids=ids).logits[:, 0], v)
        # The trap: append eos (== pad). Pooled output skips it and returns V(prefix).
        with_eos = torch.cat([ids, torch.tensor([[PAD]])], dim=1)  # [1, T+1]
        torch.testing.assert_close(model(input_ids=with_eos).logits[:, 0], v)
        assert not torch.allclose(_last_position_value(model, with_eos), v)


def test_dtype_and_depth(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    gen_dir, _ = tiny_pair
    out = make_value_model(gen_dir, tmp_path / "v", num_layers=2, dtype="bfloat16",
                           default_beta=2.0, default_top_k=5, reward="vader")
    sd = load_file(out / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert "model.layers.1.self_attn.q_proj.weight" in sd
    meta = VASMetadata.load(out)
    assert (meta.default_beta, meta.default_top_k, meta.reward) == (2.0, 5, "vader")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 2


@pytest.mark.parametrize("num_layers", [0, 3, -1])
def test_refuses_bad_depth(tiny_pair: tuple[Path, Path], tmp_path: Path, num_layers: int) -> None:
    with pytest.raises(ValueError, match=rf"num_layers must be an int in 1\.\.2 .*found {num_layers}"):
        make_value_model(tiny_pair[0], tmp_path / "v", num_layers=num_layers)


def test_refuses_overwrite_and_non_llama(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    gen_dir, value_dir = tiny_pair
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_value_model(gen_dir, value_dir, num_layers=1)
    other = tmp_path / "mistral"
    shutil.copytree(gen_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        make_value_model(other, tmp_path / "v", num_layers=1)


def test_generator_untouched_and_runs(tiny_pair: tuple[Path, Path]) -> None:
    gen = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    assert gen.config.vocab_size == 49152 and gen.config.tie_word_embeddings
    with torch.no_grad():
        assert gen(input_ids=_ids(5)).logits.shape == (1, 5, 49152)


def test_resolve_model_path_local(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    assert resolve_model_path(str(tiny_pair[0])) == tiny_pair[0].resolve()
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_model_path(tiny_pair[0] / "config.json")
    with pytest.raises(FileNotFoundError, match="does not exist locally and is not a Hugging Face hub id"):
        resolve_model_path(tmp_path / "does" / "not" / "exist")


def test_resolve_model_path_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(FileNotFoundError,
                       match="'vas-test-org/no-such-model' does not exist locally and could not be "
                             "fetched from the Hugging Face hub"):
        resolve_model_path("vas-test-org/no-such-model")


def test_tokenizer_fingerprint(smollm2_tokenizer: Path, tiny_pair: tuple[Path, Path],
                               tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    fp = tokenizer_fingerprint(tok)
    assert fp.startswith("sha256:") and fp == tokenizer_fingerprint(tok)
    # Saved copies (generator, value model) and another process agree.
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_pair[1])) == fp
    code = ("import sys; from transformers import AutoTokenizer;"
            "from value_models import tokenizer_fingerprint as f;"
            "print(f(AutoTokenizer.from_pretrained(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_tokenizer)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    assert out == fp
    # Any change to the id<->token map or special ids changes it.
    extra = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    extra.add_tokens(["<vas_extra>"])
    assert tokenizer_fingerprint(extra) != fp
    other_eos = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    other_eos.eos_token = "<|endoftext|>"
    assert tokenizer_fingerprint(other_eos) != fp
    # The pad id is not part of it (a value model may pick its own).
    other_pad = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    other_pad.pad_token = "<|endoftext|>"
    assert tokenizer_fingerprint(other_pad) == fp
