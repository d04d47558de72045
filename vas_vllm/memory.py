"""How much memory the value models take, and how many cache slots the defaults give them.

Per value model (elt: bytes per element of its dtype):
    weights   = (V * Hid + L * (Hid * (H + 2 Hkv) D + H D Hid + 3 Hid I) + Hid) * elt
    per slot  = 2 * L * Hkv * D * (max_len + 1 + max_top_k) * elt        (K/V cache + pending)
    step      = what one forward allocates on top: the attention tiles (runtime/attention.py,
                at most attn_budget elements, ~16 bytes each with their temporaries) and the
                activations of at most prefill_tokens tokens (catch-up and scoring are chunked
                to that). vLLM never profiles it (it runs inside the sampler), so it is counted
                here and, on CUDA, held until the first step (core.VASCore).

Slots: `max_concurrent` when set; otherwise as many as fit in `memory_fraction` of the memory
(CUDA: the device's total; CPU: what is available once vLLM's CPU KV cache is allocated), at
most max_num_seqs and at least 1. A 128k-context generator thus starts with fewer slots
instead of refusing to, and the start-up log says how many. Weights and the step's working set
(counted once: the models run one after another) come on top; all of it must fit.

Shape key: V vocabulary, Hid hidden size, L layers, H / Hkv query / KV heads, D head dim,
I MLP size.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vas_vllm.runtime import LlamaSpec

ATTN_BYTES_PER_ELEMENT = 16  # fp32 scores and probabilities, their cast, the mask, per tile element


class ValueModelMemoryError(RuntimeError):
    """A value model and its cache do not fit the memory that remains."""


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(spec: LlamaSpec, dtype: torch.dtype) -> int:
    hid, inter, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    per_layer = hid * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim \
        + spec.num_heads * spec.head_dim * hid + 3 * hid * inter
    return (spec.vocab_size * hid + L * per_layer + hid) * element_size(dtype)


def slot_bytes(spec: LlamaSpec, dtype: torch.dtype, max_len: int, max_top_k: int) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * (max_len + 1 + max_top_k) \
        * element_size(dtype)


def step_bytes(spec: LlamaSpec, dtype: torch.dtype, tokens: int, attn_budget: int, max_len: int) -> int:
    """An upper bound of one forward's transient allocations over at most `tokens` tokens (an
    attention tile holds at most attn_budget elements, and never more than every token's
    scores over a whole cache row)."""
    hid, inter, D = spec.hidden_size, spec.intermediate_size, spec.head_dim
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * D
    per_token = element_size(dtype) * (4 * hid + 2 * qkv + 4 * inter) + 4 * (3 * spec.num_heads * D + hid)
    tile = min(attn_budget, tokens * spec.num_heads * (max_len + D))
    return tokens * per_token + tile * ATTN_BYTES_PER_ELEMENT


@dataclass(frozen=True)
class MemoryPlan:
    slots: int
    weights: dict[str, int]     # per model
    per_slot: dict[str, int]    # per model: one slot of cache
    step: int                   # one forward's working set (models run one at a time: the largest)
    free: int | None            # bytes the plan was made against (None: unknown)

    def need(self, name: str) -> int:
        """Weights and cache of one model (the step's working set is shared: see `total`)."""
        return self.weights[name] + self.slots * self.per_slot[name]

    @property
    def total(self) -> int:
        return sum(map(self.need, self.weights)) + self.step


def plan_memory(
    specs: Mapping[str, LlamaSpec], dtype: torch.dtype, device: torch.device, *,
    max_concurrent: int | None, max_num_seqs: int, max_len: int, max_top_k: int,
    memory_fraction: float, tokens: int, attn_budget: int, free: int | None, total: int | None,
    reserved: int = 0,
) -> MemoryPlan:
    """Slots for every model (the same count for each), or ValueModelMemoryError naming the knobs.

    Without max_concurrent the caches get memory_fraction of the memory (at least one slot,
    at most max_num_seqs); the weights and the working set come on top. Whatever the slots,
    everything must fit in what is left.
    """
    weights = {n: weight_bytes(s, dtype) for n, s in specs.items()}
    per_slot = {n: slot_bytes(s, dtype, max_len, max_top_k) for n, s in specs.items()}
    step = max(step_bytes(s, dtype, tokens, attn_budget, max_len) for s in specs.values())
    left = None if free is None else free - reserved
    if max_concurrent is not None:
        slots = max_concurrent
    elif left is None:
        slots = max_num_seqs
    else:
        base = total if device.type == "cuda" and total else left
        slots = max(1, min(max_num_seqs, int(memory_fraction * base // sum(per_slot.values()))))
    plan = MemoryPlan(slots=slots, weights=weights, per_slot=per_slot, step=step, free=left)
    if left is not None and plan.total > left:
        names = ", ".join(map(repr, specs))
        raise ValueModelMemoryError(
            f"value model{'s' if len(specs) > 1 else ''} {names} need{'' if len(specs) > 1 else 's'} "
            f"about {plan.total / 2**30:.2f} GiB on {device} (weights {sum(weights.values()) / 2**30:.2f}, "
            f"a step's working set {step / 2**30:.2f}, a cache of {slots} slots x {max_len} tokens "
            f"{slots * sum(per_slot.values()) / 2**30:.2f}) but only {max(left, 0) / 2**30:.2f} GiB is left"
            + (f" once vLLM's KV cache ({reserved / 2**30:.2f} GiB) is allocated" if reserved else "")
            + "; lower additional_config.vas.max_concurrent or max_len, or "
            + ("--kv-cache-memory-bytes (VLLM_CPU_KVCACHE_SPACE)" if device.type == "cpu"
               else "the engine's --gpu-memory-utilization"))
    return plan
