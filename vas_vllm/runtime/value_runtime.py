"""ValueRuntime: exact, cached value scoring of top-k candidates for many sequences at once.

Per decoding step, for rows with token histories s_b and candidates a_bk:
    1. sync:   bring each row's cache up to len(s_b). If the one token the cache has not seen
               was among the candidates scored last step at that position, copy that
               candidate's K/V into the cache (commit-on-accept, no forward). Anything else
               (prompt, re-admission after preemption, a non-candidate sample) is computed by
               a batched, chunked `extend` forward (catch-up).
    2. score:  one forward over all rows' K candidates: head outputs at s_b ∘ a_bk, [B, K, O].
Everything equals a full, uncached forward of the same sequence up to float rounding.

The head has O outputs: O = 1 for a scalar value model (`score` then returns [B, K]), O = B bins
for a distributional one (reward logits; vas_vllm/tilts.py reduces them). Besides the candidates'
outputs, the runtime keeps each slot's output at its last cached position (`prefix_outputs`: the
value of the current prefix s, which the exact tilts need as h(s)), and on request the output at
one marked position per row during catch-up (`sync(..., marks=...)`, `marked_outputs`: the
distribution at the prompt, from which Best-of-N takes its CDF).

Shape key: B rows, K candidates, N new tokens, O head outputs, Tb longest cached prefix,
L layers, Hkv KV heads, D head dim, S slots.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from vas_vllm.runtime.attention import DEFAULT_BUDGET, plan_prefix
from vas_vllm.runtime.forward import run_layers
from vas_vllm.runtime.kv_cache import SequenceTooLongError, SlotKVCache
from vas_vllm.runtime.spec import LlamaSpec
from vas_vllm.runtime.weights import ValueWeights, load_value_weights

logger = logging.getLogger(__name__)


def _check_unique(slots: Sequence[int]) -> None:
    if len(set(slots)) != len(slots):
        raise ValueError(f"a slot appears twice in one batch: {list(slots)}")


class ValueRuntime:
    def __init__(
        self, spec: LlamaSpec, weights: ValueWeights, *, max_slots: int, max_len: int,
        max_candidates: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        prefill_chunk: int = 256, prefill_tokens: int = 2048, verify_tokens: bool = False,
        attn_budget: int = DEFAULT_BUDGET,
    ) -> None:
        if not 1 <= prefill_chunk <= prefill_tokens:
            raise ValueError(
                f"need 1 <= prefill_chunk <= prefill_tokens, got {prefill_chunk} and {prefill_tokens}")
        self.spec, self.weights = spec, weights
        self.device, self.dtype = torch.device(device), dtype
        # A catch-up forward takes at most prefill_chunk tokens of one row and prefill_tokens
        # (padded) tokens in all, which bounds its activations.
        self.prefill_chunk, self.prefill_tokens = prefill_chunk, prefill_tokens
        # Attention reads each row's prefix in place, in tiles of at most attn_budget elements
        # (scores and accumulators; runtime/attention.py), whatever B, the prefix or N.
        self.attn_budget = attn_budget
        self.inv_freq = spec.inv_freq().to(self.device)  # [D/2] fp32
        self.cache = SlotKVCache(
            num_layers=spec.num_layers, num_slots=max_slots, max_len=max_len,
            max_candidates=max_candidates, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
            dtype=dtype, device=self.device,
        )
        # verify_tokens keeps a host copy of every cached sequence and checks each history
        # against it (a debugging aid: O(T) per row and step).
        self._tokens: list[list[int]] | None = [[] for _ in range(max_slots)] if verify_tokens else None
        pin = self.device.type == "cuda"
        O = spec.num_labels
        self.num_outputs = O
        self.prefix_out = torch.zeros((max_slots, O), dtype=torch.float32, device=self.device)   # [S, O]
        self.marked_out = torch.zeros((max_slots, O), dtype=torch.float32, device=self.device)   # [S, O]
        self.pending_out = torch.zeros((max_slots, max_candidates, O), dtype=torch.float32,
                                       device=self.device)                                        # [S, Kmax, O]
        self._ids_host = torch.zeros((max_slots, max_candidates), dtype=torch.long, pin_memory=pin)
        self._ids_ready = torch.cuda.Event() if pin else None
        self._last_scored: list[tuple[int, int]] = []  # (slot, epoch) of the last candidate step
        self._last_k = 0
        self.stats = {"extend_tokens": 0, "candidates_scored": 0, "commits": 0, "forwards": 0}

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ValueRuntime":
        """Load a value model from a local folder or a Hugging Face hub id."""
        from value_models.checkpoint import resolve_model_path

        path = resolve_model_path(path)
        device = kwargs.get("device", "cpu")
        dtype = kwargs.get("dtype", torch.float32)
        spec = LlamaSpec.from_pretrained(path)
        return cls(spec, load_value_weights(path, spec, dtype=dtype, device=device), **kwargs)

    # ---- slots ---------------------------------------------------------------------------
    def allocate(self) -> int:
        slot = self.cache.allocate()
        if self._tokens is not None:
            self._tokens[slot] = []
        return slot

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def fork(self, src: int) -> int:
        """A new slot that holds what slot `src` holds: its cached K/V, length and last output
        (the search's particles branch this way: a continuation is then a catch-up of its own
        tokens only). `src` is left as it is."""
        st = self.cache.check_allocated(src)
        dst = self.allocate()
        n = st.length
        c = self.cache
        c.k[:, dst, :, :n] = c.k[:, src, :, :n]                       # [L, Hkv, n, D]
        c.v[:, dst, :, :n] = c.v[:, src, :, :n]
        self.prefix_out[dst] = self.prefix_out[src]
        self.marked_out[dst] = self.marked_out[src]
        new = c.slots[dst]
        new.length, new.marked = n, st.marked
        if self._tokens is not None:
            self._tokens[dst] = list(self._tokens[src])
        self.stats["forks"] = self.stats.get("forks", 0) + 1
        return dst

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free

    def cached_len(self, slot: int) -> int:
        return self.cache.check_allocated(slot).length

    # ---- the step ------------------------------------------------------------------------
    def score(self, slots: Sequence[int], histories: Sequence[Sequence[int]], candidates: torch.Tensor,
              marks: Sequence[int | None] | None = None) -> torch.Tensor:
        """Head outputs at history_b ∘ candidates[b, k] for every row, float32: the values
        V [B, K] for a scalar model, the bin logits [B, K, O] for a distributional one."""
        self.sync(slots, histories, marks)
        out = self.score_candidates(slots, candidates)                     # [B, K, O]
        return out[..., 0] if self.num_outputs == 1 else out

    def prefix_outputs(self, slots: Sequence[int]) -> torch.Tensor:
        """Head output at each slot's last cached position, i.e. at the history of the last
        sync: [B, O] float32 (exact, like every other output)."""
        for s in slots:
            if self.cache.check_allocated(s).length == 0:
                raise ValueError(f"slot {s} holds no tokens yet: sync it first")
        return self.prefix_out[self._index(slots)]

    def marked_outputs(self, slots: Sequence[int]) -> torch.Tensor:
        """Head output at the position each slot was marked at in its catch-up: [B, O] float32."""
        for s in slots:
            if self.cache.slots[s].marked < 0:
                raise ValueError(f"slot {s} has no marked output: pass marks= to sync")
        return self.marked_out[self._index(slots)]

    def sync(self, slots: Sequence[int], histories: Sequence[Sequence[int]],
             marks: Sequence[int | None] | None = None) -> None:
        """Make each slot's cache hold exactly its history (commit-on-accept, then catch-up).

        marks[b] (optional): a position of history_b whose head output to keep for
        `marked_outputs`; it must lie in the part of the history this call computes.
        """
        if len(slots) != len(histories):
            raise ValueError(f"got {len(slots)} slots but {len(histories)} histories")
        if marks is not None and len(marks) != len(slots):
            raise ValueError(f"got {len(slots)} slots but {len(marks)} marks")
        _check_unique(slots)
        self._collect_candidate_ids()
        commits: list[tuple[int, int, int]] = []        # (slot, position, candidate index)
        extends: list[tuple[int, Sequence[int], int]] = []  # (slot, history, first new position)
        for b, (slot, hist) in enumerate(zip(slots, histories)):
            st = self.cache.check_allocated(slot)
            n = len(hist)
            if n > self.cache.max_len:
                raise SequenceTooLongError(
                    f"sequence of {n} tokens exceeds the value-model cache's max_len {self.cache.max_len}"
                )
            if n < st.length or not self._history_matches(slot, hist, st.length):
                logger.warning("slot %d: history no longer extends the cached tokens; recomputing", slot)
                st.reset()
                if self._tokens is not None:
                    self._tokens[slot] = []
            start = st.length
            mark = None if marks is None else marks[b]
            if mark is not None:
                if not start <= mark < n:
                    raise ValueError(
                        f"slot {slot}: mark {mark} is outside the positions this sync computes "
                        f"({start}..{n - 1})")
                st.mark_at = mark
            if start == n:
                continue
            new = hist[start:]
            if min(new) < 0 or max(new) >= self.spec.vocab_size:
                raise ValueError(
                    f"slot {slot}: token ids must be in [0, {self.spec.vocab_size}), found "
                    f"{[t for t in new if not 0 <= t < self.spec.vocab_size][:5]} (an unresolved "
                    "-1 placeholder, or a generator whose vocabulary is larger than the value model's)"
                )
            if st.pending_pos == start and hist[start] in st.pending_ids:
                commits.append((slot, start, st.pending_ids.index(hist[start])))
                start += 1
            if start < n:
                extends.append((slot, hist, start))
            st.pending_pos = -1  # _commit and _extend advance st.length
        if commits:
            self._commit(commits)
        if extends:
            self._extend(extends)

    def score_candidates(self, slots: Sequence[int], candidates: torch.Tensor) -> torch.Tensor:
        """Candidates [B, K] at each slot's next position -> head outputs [B, K, O] fp32: one
        forward, or several of at most prefill_tokens candidate tokens each."""
        B, K = candidates.shape
        if B != len(slots):
            raise ValueError(f"candidates has {B} rows but {len(slots)} slots were given")
        if K > self.cache.max_candidates:
            raise ValueError(f"{K} candidates per row exceed max_candidates {self.cache.max_candidates}")
        _check_unique(slots)
        states = [self.cache.check_allocated(s) for s in slots]
        lengths = [st.length for st in states]
        if max(lengths, default=0) >= self.cache.max_len:
            raise SequenceTooLongError(
                f"a candidate at position {max(lengths)} does not fit the value-model cache's "
                f"max_len {self.cache.max_len}"
            )
        if B == 0:
            return torch.zeros((0, K, self.num_outputs), dtype=torch.float32, device=self.device)
        # At most prefill_tokens candidate tokens per forward: bounds the step's activations.
        rows = max(1, self.prefill_tokens // K)
        values = torch.cat([self._score_rows(slots[i:i + rows], lengths[i:i + rows], candidates[i:i + rows])
                            for i in range(0, B, rows)])                # [B, K, O]
        self.pending_out[self._index(slots), :K] = values
        for st, length in zip(states, lengths):
            st.pending_pos = length
        # Candidate ids go to the host asynchronously; they are read at the next sync, after
        # vLLM's sampler has synchronised anyway.
        self._ids_host[:B, :K].copy_(candidates, non_blocking=True)
        if self._ids_ready is not None:
            self._ids_ready.record()
        self._last_scored = [(s, st.epoch) for s, st in zip(slots, states)]
        self._last_k = K
        self.stats["candidates_scored"] += B * K
        return values

    # ---- internals -----------------------------------------------------------------------
    def _score_rows(self, slots: Sequence[int], lengths: Sequence[int], candidates: torch.Tensor) -> torch.Tensor:
        """The forward of score_candidates for some rows: [B, K] -> [B, K, O]; K/V to pending."""
        B, K = candidates.shape
        slots_t = self._index(slots)                                    # [B]
        positions = self._index(lengths)[:, None].expand(B, K)          # [B, K]

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v [B, K, Hkv, D]
            self.cache.pending_k[layer][slots_t, :K] = k
            self.cache.pending_v[layer][slots_t, :K] = v

        # mask None: each candidate sees its row's prefix and itself only
        return self._forward(candidates, positions, None, slots, lengths, sink)

    def _index(self, values: Sequence[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _history_matches(self, slot: int, hist: Sequence[int], length: int) -> bool:
        return self._tokens is None or list(hist[:length]) == self._tokens[slot][:length]

    def _collect_candidate_ids(self) -> None:
        if not self._last_scored:
            return
        if self._ids_ready is not None:
            self._ids_ready.synchronize()
        ids = self._ids_host[: len(self._last_scored), : self._last_k].tolist()
        for (slot, epoch), row in zip(self._last_scored, ids):
            st = self.cache.slots[slot]
            if st.epoch == epoch:  # the slot was not released (and perhaps reused) since
                st.pending_ids = row
        self._last_scored = []

    def _commit(self, commits: list[tuple[int, int, int]]) -> None:
        slots_t = self._index([c[0] for c in commits])   # [C]
        pos_t = self._index([c[1] for c in commits])     # [C]
        cand_t = self._index([c[2] for c in commits])    # [C]
        c = self.cache
        # pending[:, slots, cand]: [L, C, Hkv, D]; cache[:, slots, :, pos] indexes as [C, L, Hkv, D].
        c.k[:, slots_t, :, pos_t] = c.pending_k[:, slots_t, cand_t].transpose(0, 1)
        c.v[:, slots_t, :, pos_t] = c.pending_v[:, slots_t, cand_t].transpose(0, 1)
        self.prefix_out[slots_t] = self.pending_out[slots_t, cand_t]                 # [C, O]
        for slot, pos, cand in commits:
            st = c.slots[slot]
            if st.mark_at == pos:  # the marked position is the accepted candidate's
                self.marked_out[slot] = self.pending_out[slot, cand]
                st.marked, st.mark_at = pos, -1
            st.length = pos + 1
            if self._tokens is not None:
                self._tokens[slot].append(st.pending_ids[cand])
        self.stats["commits"] += len(commits)

    def _extend(self, rows: list[tuple[int, Sequence[int], int]]) -> None:
        """Catch-up: append each row's history[start:] to its cache, in bounded forwards."""
        todo = list(rows)
        while todo:
            chunk = [(slot, hist[start:start + self.prefill_chunk], start) for slot, hist, start in todo]
            rows_per_forward = max(1, self.prefill_tokens // max(len(toks) for _, toks, _ in chunk))
            for i in range(0, len(chunk), rows_per_forward):
                self._extend_once(chunk[i:i + rows_per_forward])
            todo = [(slot, hist, start + self.prefill_chunk) for slot, hist, start in todo
                    if start + self.prefill_chunk < len(hist)]

    def _extend_once(self, rows: list[tuple[int, Sequence[int], int]]) -> None:
        B = len(rows)
        N = max(len(toks) for _, toks, _ in rows)
        scratch = self.cache.max_len  # padded tokens write their K/V to the scratch column
        tokens = [list(toks) + [0] * (N - len(toks)) for _, toks, _ in rows]
        positions = [[start + j for j in range(N)] for _, _, start in rows]
        write_pos = [[start + j if j < len(toks) else scratch for j in range(N)] for _, toks, start in rows]
        slots = [slot for slot, _, _ in rows]
        slots_t = self._index(slots)                                   # [B]
        tokens_t, pos_t, write_t = self._index(tokens), self._index(positions), self._index(write_pos)  # [B, N]
        # Padding follows each row's real tokens, so a causal mask never shows it to them.
        causal = torch.ones((N, N), dtype=torch.bool, device=self.device).tril()        # [N, N]
        slots_bn = slots_t[:, None].expand(B, N)                                        # [B, N]

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v [B, N, Hkv, D]
            self.cache.k[layer][slots_bn, :, write_t] = k
            self.cache.v[layer][slots_bn, :, write_t] = v

        out = self._forward(tokens_t, pos_t, causal.expand(B, 1, N, N), slots,
                            [start for _, _, start in rows], sink)          # [B, N, O]
        last = self._index([len(toks) - 1 for _, toks, _ in rows])               # [B]
        self.prefix_out[slots_t] = out[torch.arange(B, device=self.device), last]
        marked = [(b, slot, self.cache.slots[slot].mark_at - start) for b, (slot, toks, start) in enumerate(rows)
                  if 0 <= self.cache.slots[slot].mark_at - start < len(toks)]
        if marked:
            b_t, s_t, j_t = (self._index(list(col)) for col in zip(*marked))
            self.marked_out[s_t] = out[b_t, j_t]                                   # [M, O]
            for _, slot, _ in marked:
                st = self.cache.slots[slot]
                st.marked, st.mark_at = st.mark_at, -1
        for slot, toks, start in rows:
            self.cache.slots[slot].length = start + len(toks)
            if self._tokens is not None:
                self._tokens[slot].extend(toks)
        self.stats["extend_tokens"] += sum(len(toks) for _, toks, _ in rows)

    def _forward(self, tokens, positions, mask, slots, lengths, sink) -> torch.Tensor:
        """run_layers over tokens [B, N] whose rows have `lengths` tokens cached at `slots`
        (attended in place); mask [B, 1, N, N] is what the new tokens see of each other."""
        self.stats["forwards"] += 1
        plan = plan_prefix(self.cache.k, self.cache.v, slots, lengths, queries=tokens.shape[1],
                           heads=self.spec.num_heads, head_dim=self.spec.head_dim,
                           budget=self.attn_budget, index=self._index)
        return run_layers(self.spec, self.weights, self.inv_freq, tokens, positions, mask, plan, sink)
