"""The models benchmarks/gpu_scale.py times, built in memory: Llama shapes (TinyLlama-1.1B value
model, Llama-2-7B generator, tiny twins for CPU tests), random fused weights, the generator's
plain-torch decode step (the reference cost), and the bytes and FLOPs each step must move.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vas_vllm.runtime import LlamaSpec, ValueWeights
from vas_vllm.runtime.forward import apply_rope, rms_norm, rope_cos_sin
from vas_vllm.runtime.weights import LayerWeights


def llama_config(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}


VALUE_SHAPE = llama_config(32000, 2048, 5632, 22, 32, 4)       # TinyLlama-1.1B
GENERATOR_SHAPE = llama_config(32000, 4096, 11008, 32, 32, 32)  # Llama-2-7B
TINY_VALUE_SHAPE = llama_config(256, 64, 160, 2, 4, 2)
TINY_GENERATOR_SHAPE = llama_config(256, 64, 172, 2, 4, 4)

# ---- random weights ---------------------------------------------------------------------------
def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)


def random_layers(spec: LlamaSpec, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> list[LayerWeights]:
    """Fused Llama layers with fan-in scaled weights (activations stay O(1) in every layer)."""
    H, hkv, D, hid, inter = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.intermediate_size

    def lin(rows: int, cols: int) -> torch.Tensor:
        return _randn((rows, cols), cols ** -0.5, gen, device, dtype)

    def norm() -> torch.Tensor:
        return _randn((hid,), 0.3, gen, device, dtype).add_(1.0)

    return [LayerWeights(ln_attn=norm(), qkv_w=lin((H + 2 * hkv) * D, hid), qkv_b=None, o_w=lin(hid, H * D),
                         o_b=None, ln_mlp=norm(), gate_up_w=lin(2 * inter, hid), gate_up_b=None,
                         down_w=lin(hid, inter), down_b=None)
            for _ in range(spec.num_layers)]


def random_value_weights(spec: LlamaSpec, *, device: torch.device, dtype: torch.dtype, seed: int) -> ValueWeights:
    gen = torch.Generator(device=device).manual_seed(seed)
    hid = spec.hidden_size
    return ValueWeights(embed=_randn((spec.vocab_size, hid), 1.0, gen, device, dtype),
                        layers=random_layers(spec, gen, device, dtype),
                        norm=torch.ones(hid, device=device, dtype=torch.float32),  # norm and head run in fp32
                        score_w=_randn((1, hid), hid ** -0.5, gen, device, torch.float32), score_b=None)


@dataclass
class GeneratorWeights:
    embed: torch.Tensor     # [V, Hid]
    layers: list[LayerWeights]
    norm: torch.Tensor      # [Hid]
    lm_head: torch.Tensor   # [V, Hid]


def random_generator_weights(spec: LlamaSpec, *, device: torch.device, dtype: torch.dtype, seed: int) -> GeneratorWeights:
    gen = torch.Generator(device=device).manual_seed(seed)
    hid, V = spec.hidden_size, spec.vocab_size
    return GeneratorWeights(embed=_randn((V, hid), 1.0, gen, device, dtype),
                            layers=random_layers(spec, gen, device, dtype),
                            norm=torch.ones(hid, device=device, dtype=dtype),
                            lm_head=_randn((V, hid), hid ** -0.5, gen, device, dtype))


# ---- the generator's decode step (the reference cost) ------------------------------------------
def decode_step(spec: LlamaSpec, w: GeneratorWeights, inv_freq: torch.Tensor, tokens: torch.Tensor, pos: int,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """tokens [B] at position `pos` -> logits [B, V]. k/v_cache [L, B, Hkv, T, D] with T == pos + 1
    hold positions < pos; this step's K/V are written at `pos` and attended to with the rest."""
    B = tokens.shape[0]
    H, hkv, D, eps = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps
    x = F.embedding(tokens[:, None], w.embed)                                  # [B, 1, Hid]
    positions = torch.full((B, 1), pos, device=tokens.device)                  # [B, 1]
    cos, sin = rope_cos_sin(inv_freq, positions, x.dtype)                      # [B, 1, 1, D]
    for layer, lw in enumerate(w.layers):
        qkv = F.linear(rms_norm(x, lw.ln_attn, eps), lw.qkv_w)                 # [B, 1, (H + 2*Hkv) * D]
        q, k, v = qkv.split([H * D, hkv * D, hkv * D], dim=-1)
        q = apply_rope(q.view(B, 1, H, D), cos, sin).transpose(1, 2)           # [B, H, 1, D]
        k_cache[layer, :, :, pos] = apply_rope(k.view(B, 1, hkv, D), cos, sin)[:, 0]  # [B, Hkv, D]
        v_cache[layer, :, :, pos] = v.view(B, hkv, D)
        attn = F.scaled_dot_product_attention(q, k_cache[layer], v_cache[layer],
                                              enable_gqa=spec.group_size > 1)  # [B, H, 1, D]
        x = x + F.linear(attn.transpose(1, 2).reshape(B, 1, H * D), lw.o_w)
        gate, up = F.linear(rms_norm(x, lw.ln_mlp, eps), lw.gate_up_w).chunk(2, dim=-1)  # 2 x [B, 1, I]
        x = x + F.linear(F.silu(gate) * up, lw.down_w)
    return F.linear(rms_norm(x, w.norm, eps)[:, 0], w.lm_head)                # [B, V]


# ---- bytes, FLOPs, memory ----------------------------------------------------------------------
def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layers_bytes(layers: list[LayerWeights]) -> int:
    return sum(tensor_bytes(lw.ln_attn, lw.qkv_w, lw.qkv_b, lw.o_w, lw.o_b, lw.ln_mlp, lw.gate_up_w,
                       lw.gate_up_b, lw.down_w, lw.down_b) for lw in layers)


def kv_token_bytes(spec: LlamaSpec, elsize: int) -> int:
    """K and V of one token in every layer."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * elsize


def step_flops(spec: LlamaSpec, tokens: int, ctx: float, head_rows: int) -> float:
    """Matmul FLOPs of `tokens` query tokens, each attending to `ctx` keys."""
    H, hkv, D, hid, inter = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.intermediate_size
    params = spec.num_layers * ((H + 2 * hkv) * D * hid + hid * H * D + 3 * inter * hid) + head_rows * hid
    return tokens * (2.0 * params + 4.0 * spec.num_layers * H * D * ctx)


def value_cell_bytes(spec: LlamaSpec, batch: int, max_len: int, k: int, elsize: int) -> int:
    """Device memory a value cell allocates: its cache plus one layer's transients at the peak."""
    cache = kv_token_bytes(spec, elsize) * batch * (max_len + 1 + k)           # cache + pending
    hkv, D, G = spec.num_kv_heads, spec.head_dim, spec.group_size
    gathered = 4 * batch * hkv * (max_len + k) * D * elsize                     # prefix K/V, then cat
    mask = batch * G * k * (max_len + k) * (1 + elsize)                         # bool, and as a bias
    acts = batch * k * (2 * spec.intermediate_size + 6 * spec.hidden_size) * 4
    return cache + gathered + mask + acts


def generator_cell_bytes(spec: LlamaSpec, batch: int, prefix: int, elsize: int) -> int:
    acts = batch * (2 * spec.intermediate_size + spec.vocab_size + 6 * spec.hidden_size) * 4
    return kv_token_bytes(spec, elsize) * batch * (prefix + 1) + acts
