"""Tiny random value models and the slow, obviously-correct reference they are checked against."""
from __future__ import annotations

from collections.abc import Sequence
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

    Weights are drawn with a large spread so values are O(1): a wrong cache entry, position or
    candidate moves them by O(0.1-1), far above their float32 error bounds (fp_bounds.py).
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


# The runtime computes the reference's operations with the same inner lengths, reading cached K/V,
# but normalises attention by merging partial softmaxes (flash-decoding): per attention weight one
# more exp (2 ulps) and two multiplies, against the 20-ulp exp and the sum the bound charges for
# it. RUNTIME_SLACK allows it up to as large an error again per op (four times the variance).
RUNTIME_SLACK = 2.0


class Float64ValueModel:
    """A float64 copy of a saved value model whose forwards, run under a fp_bounds
    RoundingTracer, record the rounding errors a float32 run would make.

    Its structure follows the cached runtime's: the history is one causal forward (every
    position's K/V computed once, as the runtime's cache holds it), and the K candidates are one
    forward of one token each over that shared prefix. So a rounding the runtime makes once and
    every candidate reads (a cached K/V, a rotary table) is one rounding here too: counted once,
    with the derivative summed over every candidate that reads it.
    """

    def __init__(self, folder: Path) -> None:
        from fp_bounds import watch

        self.model = LlamaForSequenceClassification.from_pretrained(
            folder, dtype=torch.float64, attn_implementation="eager").eval()
        watch(self.model)   # weights are exact (float32 values), but ops downstream must be tracked

    def _forward(self, tokens: list[int], start: int, cache: object) -> torch.Tensor:
        """tokens at positions start.. appended to `cache`: last hidden states [1, N, Hid]."""
        return self._forward_rows([tokens], start, cache)

    def _forward_rows(self, rows: list[list[int]], start: int, cache: object) -> torch.Tensor:
        # position_ids [1, N]: one rotary table for every row, as the runtime computes the same
        # rounded angles for every row at a position
        n = len(rows[0])
        return self.model.model(input_ids=torch.tensor(rows), past_key_values=cache, use_cache=True,
                                position_ids=torch.arange(start, start + n)[None],
                                cache_position=torch.arange(start, start + n)).last_hidden_state

    def prefix(self, history: list[int], positions: Sequence[int] = (-1,)) -> tuple[torch.Tensor, object]:
        """Head outputs at the given positions of history [P, O], and its KV cache (every
        position). The history runs in segments that end at the positions asked for, so no
        later position's ops are traced with the output read there."""
        from transformers import DynamicCache

        n = len(history)
        cache, outs, start = DynamicCache(config=self.model.config), {}, 0
        for p in sorted({p % n for p in positions}):
            outs[p] = self.model.score(self._forward(history[start:p + 1], start, cache)[0, -1])   # [O]
            start = p + 1
        if start < n:
            self._forward(history[start:], start, cache)
        if not positions:
            return torch.zeros((0, self.model.config.num_labels), dtype=torch.float64), cache
        return torch.stack([outs[p % n] for p in positions]), cache

    def candidates(self, cache: object, n: int, candidates: list[int]) -> torch.Tensor:
        """Head outputs at history ∘ a for each candidate a [K, O]; `cache` from prefix (used up)."""
        cache.batch_repeat_interleave(len(candidates))   # every row reads the one prefix
        return self.model.score(self._forward_rows([[a] for a in candidates], n, cache)[:, -1])  # [K, O]

    def bounded(self, history: list[int], candidates: list[int], position: int | None = -1,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(values [K, O], their bound, head output at `position` of history [O], its bound; None
        for position None): float64 references and float32 error bounds (fp_bounds' probabilistic
        bound) of the computation itself; compare the runtime with RUNTIME_SLACK x the bound."""
        from fp_bounds import RoundingTracer

        tracer = RoundingTracer()
        with tracer:
            at, cache = self.prefix(list(history), [] if position is None else [position])  # [P, O]
            values = (self.candidates(cache, len(history), list(candidates)) if len(candidates)
                      else at.new_zeros((0, self.model.config.num_labels)))
        bound = tracer.bound(torch.cat([values.reshape(-1), at.reshape(-1)]))
        K, O = values.shape
        if position is None:
            return values.detach(), bound.view(K, O), None, None
        return values.detach(), bound[:K * O].view(K, O), at[0].detach(), bound[K * O:]
