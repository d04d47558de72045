"""Config parsing and RoPE frequencies against transformers' own rope initialisers."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from value_reference import ROPE_VARIANTS, make_tiny_value_model
from vas_vllm.runtime import LlamaSpec, UnsupportedModelError, ValueRuntime


def base_cfg(**extra) -> dict:
    return {"model_type": "llama", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **extra}


@pytest.mark.parametrize("rope", ["linear", "llama3"])
def test_inv_freq_matches_transformers(rope):
    params = {**ROPE_VARIANTS[rope], "rope_theta": 1234.0}
    cfg = LlamaConfig(**{k: v for k, v in base_cfg().items() if k != "model_type"}, rope_parameters=params)
    expected, scaling = ROPE_INIT_FUNCTIONS[rope](cfg, "cpu")
    assert scaling == 1.0
    spec = LlamaSpec.from_config_dict(cfg.to_dict())
    torch.testing.assert_close(spec.inv_freq(), expected, rtol=0, atol=0)  # the same float32 ops: bitwise


def test_transformers4_layout_is_read():
    # transformers 4.x writes rope_theta at the top level and the scaling under rope_scaling.
    spec = LlamaSpec.from_config_dict(base_cfg(rope_theta=777.0, rope_scaling={"type": "linear", "factor": 4.0}))
    assert (spec.rope_theta, spec.rope_type, dict(spec.rope_params)) == (777.0, "linear", {"factor": 4.0})
    assert spec.group_size == 2 and spec.head_dim == 16


@pytest.mark.parametrize("cfg, message", [
    (base_cfg(model_type="gpt2"), "model_type 'gpt2' is not a Llama-family model"),
    (base_cfg(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    (base_cfg(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "needs \\['low_freq_factor'"),
    (base_cfg(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (base_cfg(hidden_act="gelu"), "hidden_act must be 'silu'"),
    (base_cfg(model_type="mistral", sliding_window=4096), "sliding-window attention is not supported"),
])
def test_unsupported_configs_are_refused(cfg, message):
    with pytest.raises(UnsupportedModelError, match=message):
        LlamaSpec.from_config_dict(cfg)


def test_checkpoint_without_score_head_is_refused(tmp_path):
    make_tiny_value_model(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    del state["score.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="no 'score.weight'"):
        ValueRuntime.from_pretrained(tmp_path, max_slots=1, max_len=8, max_candidates=2)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in value-model folder"):
        ValueRuntime.from_pretrained(tmp_path, max_slots=1, max_len=8, max_candidates=2)


def test_bf16_runtime_tracks_fp32(tmp_path):
    make_tiny_value_model(tmp_path, seed=5)
    hist, cands = list(range(3, 40)), torch.arange(50, 58)[None]
    fp32 = ValueRuntime.from_pretrained(tmp_path, max_slots=1, max_len=64, max_candidates=8)
    bf16 = ValueRuntime.from_pretrained(tmp_path, max_slots=1, max_len=64, max_candidates=8, dtype=torch.bfloat16)
    a = fp32.score([fp32.allocate()], [hist], cands)
    b = bf16.score([bf16.allocate()], [hist], cands)
    assert b.dtype == torch.float32
    # Not a rounding bound: a smoke test that bf16 is wired in (no NaN, no garbage). bf16's unit
    # roundoff is 2^-8 = 3.9e-3 per operation; O(1) values through 2 layers move by a few 1e-2.
    torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)
