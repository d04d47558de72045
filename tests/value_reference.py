"""Tiny random value models and the slow, obviously-correct reference they are checked against."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}


def make_tiny_value_model(
    folder: Path, *, seed: int = 0, vocab: int = 101, hidden: int = 64, layers: int = 2,
    heads: int = 4, kv_heads: int = 2, rope: str = "default", tied: bool = False,
    rope_theta: float = 500.0, head_dim: int | None = None, num_labels: int = 1,
) -> LlamaForSequenceClassification:
    """Save a randomly initialised LlamaForSequenceClassification to `folder` (num_labels 1: a
    scalar value model; more: a distributional head's bin logits).

    Weights are drawn with a large spread so values are O(1) and a 1e-4 tolerance is meaningful.
    """
    torch.manual_seed(seed)
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if ROPE_VARIANTS[rope]:
        rope_parameters = {**ROPE_VARIANTS[rope], "rope_theta": rope_theta}
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=512, rope_parameters=rope_parameters, num_labels=num_labels,
        pad_token_id=0, tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    model = LlamaForSequenceClassification(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def reference_values(model: LlamaForSequenceClassification, history: list[int], candidates: list[int]) -> torch.Tensor:
    """V(history ∘ a) for each candidate a by a full, uncached forward: [K] fp32 (a scalar head)
    or [K, O] (a head of O outputs).

    Pools at the last position explicitly (model.score on the last hidden state), avoiding the
    pad-token pooling trap of the classifier's own output.
    """
    ids = torch.tensor([history + [a] for a in candidates])        # [K, n + 1]
    hidden = model.model(input_ids=ids).last_hidden_state[:, -1]   # [K, Hid]
    out = model.score(hidden).float()                              # [K, O]
    return out[:, 0] if out.shape[-1] == 1 else out


@torch.no_grad()
def reference_prefix_output(model: LlamaForSequenceClassification, history: list[int], position: int = -1) -> torch.Tensor:
    """The head at one position of `history` (default: its last) by a full forward: [O] fp32."""
    hidden = model.model(input_ids=torch.tensor([history])).last_hidden_state[0, position]  # [Hid]
    return model.score(hidden).float()                                                    # [O]
