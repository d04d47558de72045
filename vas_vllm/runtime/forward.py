"""The value model's forward pass over a slot KV cache: one function per step kind.

Two kinds of step share `run_layers` (attention over the cache: runtime/attention.py):
- `extend`: rows append N new tokens to their cached prefix (prompt prefill, catch-up).
  New tokens attend causally to themselves and to the row's cache; their K/V are written
  into the cache.
- `score_candidates`: every row proposes K candidate next tokens at the same position.
  Each candidate attends to its row's cached prefix and to itself only, never to a sibling.
  Their K/V go to a per-slot pending buffer, to be committed if one of them is sampled.

Shape key: B rows, N new tokens per row, K candidates, Tb longest cached prefix in the batch,
L layers, H query heads, Hkv KV heads, G = H // Hkv, D head dim, Hid hidden size, I MLP size.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vas_vllm.runtime.attention import PrefixPlan, attend
from vas_vllm.runtime.spec import LlamaSpec
from vas_vllm.runtime.weights import LayerWeights, ValueWeights

# Called once per layer with that layer's new rotated keys and values, both [B, N, Hkv, D].
KVSink = Callable[[int, torch.Tensor, torch.Tensor], None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order and fp32 accumulation as transformers' LlamaRMSNorm.
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, N] -> cos, sin [B, N, 1, D] in `dtype` (angles in fp32, as transformers)."""
    freqs = positions.float()[..., None] * inv_freq          # [B, N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]   # [B, N, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, Hx, D] rotated by position (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _layer(
    spec: LlamaSpec, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    mask: torch.Tensor | None, layer: int, prefix: PrefixPlan | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, N, Hid] -> (x' [B, N, Hid], k [B, N, Hkv, D], v [B, N, Hkv, D])."""
    B, N, _ = x.shape
    H, hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    h = rms_norm(x, w.ln_attn, spec.rms_norm_eps)
    qkv = F.linear(h, w.qkv_w, w.qkv_b)                            # [B, N, (H + 2*Hkv) * D]
    q, k, v = qkv.split([H * D, hkv * D, hkv * D], dim=-1)
    q = apply_rope(q.reshape(B, N, H, D), cos, sin)                # [B, N, H, D]
    k = apply_rope(k.reshape(B, N, hkv, D), cos, sin)              # [B, N, Hkv, D]
    v = v.reshape(B, N, hkv, D)                                    # [B, N, Hkv, D]
    attn = attend(q, k, v, mask, spec.group_size, layer, prefix)  # [B, N, H * D]
    x = x + F.linear(attn, w.o_w, w.o_b)
    h = rms_norm(x, w.ln_mlp, spec.rms_norm_eps)
    gate, up = F.linear(h, w.gate_up_w, w.gate_up_b).chunk(2, dim=-1)  # 2 x [B, N, I]
    x = x + F.linear(F.silu(gate) * up, w.down_w, w.down_b)
    return x, k, v


def run_layers(
    spec: LlamaSpec, weights: ValueWeights, inv_freq: torch.Tensor,
    tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
    prefix: PrefixPlan | None, sink: KVSink,
) -> torch.Tensor:
    """tokens, positions [B, N]; mask [B, 1, N, N]: which new tokens each new token sees
    (True = may attend), or None: each sees itself only (scoring candidates) -> head outputs at every new token [B, N, O] fp32 (O = 1: the value
    V(row prefix ∘ token); O = B bins: the reward logits).

    Every new token also sees its row's whole cached prefix, read in place from the cache as
    `prefix` says (None: no prefix); `sink(l, k, v)` receives each layer's new K/V after that
    layer's attention, before the next layer runs.
    """
    x = F.embedding(tokens, weights.embed)                         # [B, N, Hid]
    cos, sin = rope_cos_sin(inv_freq, positions, x.dtype)          # [B, N, 1, D] each
    g = spec.group_size
    mask_g = None
    if mask is not None:  # the same mask for all G query heads that share a KV head: [B, 1, G*N, N]
        B, _, n_q, n_k = mask.shape
        mask_g = mask.expand(B, g, n_q, n_k).reshape(B, 1, g * n_q, n_k)
    for i, layer in enumerate(weights.layers):
        x, k, v = _layer(spec, layer, x, cos, sin, mask_g, i, prefix)
        sink(i, k, v)
    # Final norm and head in fp32 (weights.py keeps them fp32): one rounding less than the model dtype.
    h = rms_norm(x.float(), weights.norm, spec.rms_norm_eps)
    return F.linear(h, weights.score_w, weights.score_b)              # [B, N, O] fp32
