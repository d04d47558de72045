"""Pre-allocated, slot-indexed KV cache for the value model, and its slot allocator.

Every concurrent VAS sequence owns one slot. The cache is allocated once, up front (inside
vLLM's processor constructor, so vLLM's memory profiling sees it), and never grows.

    k, v        [L, S, Hkv, T + 1, D]   position T is a scratch column for padded writes
    pending_k/v [L, S, Kmax, Hkv, D]    the last scored candidates' K/V, per slot
Shape key: L layers, S slots, T max tokens per sequence, Kmax max candidates, Hkv KV heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SlotsExhaustedError(RuntimeError):
    """Every value-model cache slot is in use."""


class SequenceTooLongError(ValueError):
    """A sequence does not fit in the value-model cache's max_len."""


@dataclass
class SlotState:
    """Host-side books for one slot: what the cache holds, and the pending candidates."""
    length: int = 0                          # tokens whose K/V are in the cache
    pending_pos: int = -1                    # position the pending candidates were scored at
    pending_ids: list[int] = field(default_factory=list)  # their token ids, in buffer order
    epoch: int = 0                           # bumped on every reset, so stale books are never applied
    mark_at: int = -1                        # position whose head output the catch-up keeps
    marked: int = -1                         # position whose head output was kept (-1: none)

    def reset(self) -> None:
        self.length, self.pending_pos, self.pending_ids = 0, -1, []
        self.mark_at = self.marked = -1
        self.epoch += 1


class SlotKVCache:
    def __init__(
        self, *, num_layers: int, num_slots: int, max_len: int, max_candidates: int,
        num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        if num_slots < 1 or max_len < 1 or max_candidates < 1:
            raise ValueError(
                f"num_slots, max_len and max_candidates must be >= 1, got "
                f"{num_slots}, {max_len}, {max_candidates}"
            )
        self.num_slots, self.max_len, self.max_candidates = num_slots, max_len, max_candidates
        shape = (num_layers, num_slots, num_kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        pshape = (num_layers, num_slots, max_candidates, num_kv_heads, head_dim)
        self.pending_k = torch.zeros(pshape, dtype=dtype, device=device)
        self.pending_v = torch.zeros(pshape, dtype=dtype, device=device)
        self.slots = [SlotState() for _ in range(num_slots)]
        # Pop from the end: low slot numbers first, which keeps gathers compact.
        self._free = list(range(num_slots - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> frozenset[int]:
        return frozenset(self._used)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pending_k, self.pending_v))

    def allocate(self) -> int:
        if not self._free:
            raise SlotsExhaustedError(
                f"all {self.num_slots} value-model cache slots are in use; raise "
                "additional_config.vas.max_concurrent or lower the number of concurrent VAS requests"
            )
        slot = self._free.pop()
        self._used.add(slot)
        self.slots[slot].reset()
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated (allocated: {sorted(self._used)})")
        self._used.remove(slot)
        self.slots[slot].reset()
        self._free.append(slot)

    def check_allocated(self, slot: int) -> SlotState:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated (allocated: {sorted(self._used)})")
        return self.slots[slot]
