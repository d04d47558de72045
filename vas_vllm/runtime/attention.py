"""Attention of a step's new tokens over the slot KV cache, read in place.

A row's new tokens (its K candidates, or the N tokens of a catch-up chunk) attend to two key
sets: the row's cached prefix, which lives in the cache at the row's slot, and the new tokens'
own keys (a candidate: itself only; a chunk: causally). Neither is copied or concatenated:
- the prefix is read as strided views of the cache, one view per run of nearby slots (a
  `Segment`), in tiles of `block` keys;
- each tile, and then the new keys, are folded into a running (max, sum, weighted values) with
  the log-sum-exp update flash-decoding uses to merge splits. The result equals softmax
  attention over the concatenated keys exactly, up to float rounding.
The tiles bound the step's working set: a tile's scores and accumulators take at most
`budget` elements whatever the batch, prefix or chunk size (see `plan_prefix`).

Shape key: B rows, N new tokens per row, H query heads, Hkv KV heads, G = H // Hkv, Q = G*N
queries per KV head, D head dim, W slots in a segment, Tb keys read per slot, L layers,
S slots, T max tokens per slot.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIN_BLOCK = 64               # fewest keys per tile (a segment is narrowed before tiles shrink below)
DEFAULT_BUDGET = 1 << 24     # elements per tile: fp32 scores + accumulators, ~64 MiB each


@dataclass(frozen=True)
class Segment:
    """A run of slots [lo, lo + width) read as one strided view of the cache."""

    lo: int
    width: int
    tb: int              # keys read per slot: the longest cached prefix in the run
    block: int           # keys per tile
    rows: torch.Tensor   # [r] batch rows whose slots lie in the run
    at: torch.Tensor     # [r] their slot - lo
    lens: torch.Tensor   # [W] cached tokens per slot of the run (0 for slots not in the batch)
    direct: bool = False  # the run is the whole batch: row b at slot lo + b


@dataclass(frozen=True)
class PrefixPlan:
    """Where each row's cached prefix is, for every layer of one forward."""

    k: torch.Tensor                 # [L, S, Hkv, T + 1, D], read in place
    v: torch.Tensor                 # [L, S, Hkv, T + 1, D]
    segments: tuple[Segment, ...]


def plan_prefix(
    k: torch.Tensor, v: torch.Tensor, slots: Sequence[int], lengths: Sequence[int], *,
    queries: int, heads: int, head_dim: int, budget: int = DEFAULT_BUDGET,
    index: Callable[[Sequence[int]], torch.Tensor],
) -> PrefixPlan:
    """Group the rows' slots into runs read as one view each, and size their tiles.

    Slots join a run while at least half of the run's slots are rows of the batch (the
    others are read and masked: wasted work, bounded by 2x), and while one tile of the run
    fits the budget: width * heads * queries * (block + head_dim) <= budget with
    block >= MIN_BLOCK. `index(values)` makes a device index tensor.
    """
    per_slot = heads * queries * (MIN_BLOCK + head_dim)      # elements of a minimal tile per slot
    max_width = max(1, budget // per_slot)
    order = sorted(range(len(slots)), key=lambda b: slots[b])
    runs: list[list[int]] = []
    for b in order:
        run = runs[-1] if runs else None
        if run is not None:
            width = slots[b] - slots[run[0]] + 1
            if width <= max(2 * (len(run) + 1), 1) and width <= max_width:
                run.append(b)
                continue
        runs.append([b])
    segments = []
    for run in runs:
        tb = max(lengths[b] for b in run)
        if tb == 0:
            continue  # no row of the run has a cached token yet
        lo = slots[run[0]]
        width = slots[run[-1]] - lo + 1
        lens = [0] * width
        for b in run:
            lens[slots[b] - lo] = lengths[b]
        block = max(1, min(tb, budget // (width * heads * queries) - head_dim))
        direct = run == list(range(len(slots))) and width == len(slots)  # rows 0..B-1 at lo..lo+B-1
        segments.append(Segment(lo=lo, width=width, tb=tb, block=block, rows=index(run),
                                at=index([slots[b] - lo for b in run]), lens=index(lens), direct=direct))
    return PrefixPlan(k=k, v=v, segments=tuple(segments))


def _cpu_flash() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


# On CPU, prefix tiles go through torch's fused flash-attention kernel, which also returns the
# log-sum-exp (a private op, probed once; about 10x faster than the unfused ops here). Elsewhere
# the same tile is computed with matmuls and an fp32 softmax. The tests run both.
FUSED_CPU = _cpu_flash()


def _tile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor,
          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tile: q [W, Hkv, Q, D] over keys k, v [W, Hkv, t, D] where live [W, 1 or Q, t]
    -> (m, l, acc): the max score [W, Hkv, Q], the sum of exp(s - m) [W, Hkv, Q] and
    exp(s - m) @ v [W, Hkv, Q, D], in fp32 (m = -inf where no key is live)."""
    if FUSED_CPU and q.device.type == "cpu" and live.shape[1] == 1:
        bias = torch.zeros(live.shape, dtype=q.dtype).masked_fill_(~live, float("-inf"))[:, None]  # [W, 1, 1, t]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)          # [W, Hkv, Q, D], [W, Hkv, Q]
        # out is normalised (its sum is 1 at m = lse); a row with no live key gets lse 0: -inf
        lse = lse.masked_fill(~live.any(-1)[:, :, None], float("-inf"))
        return lse, torch.ones_like(lse), out.float()
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)       # [W, Hkv, Q, t]
    s.masked_fill_(~live[:, None], float("-inf"))
    m = s.amax(-1)                                                      # [W, Hkv, Q]
    p = torch.exp(s.sub_(m.masked_fill(m == float("-inf"), 0.0)[..., None]))
    return m, p.sum(-1), torch.matmul(p.to(v.dtype), v).float()


State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (m [.., Q], l [.., Q], acc [.., Q, D]) fp32


def _merge(a: State, b: State) -> State:
    """The log-sum-exp merge of two partial softmax results over disjoint key sets, as
    flash-decoding merges splits (rows that have seen no key have m = -inf)."""
    (m1, l1, acc1), (m2, l2, acc2) = a, b
    m = torch.maximum(m1, m2)
    m_safe = m.masked_fill(m == float("-inf"), 0.0)
    c1, c2 = torch.exp(m1 - m_safe), torch.exp(m2 - m_safe)             # [.., Q]
    return m, l1 * c1 + l2 * c2, acc1 * c1[..., None] + acc2 * c2[..., None]


def _prefix(qg: torch.Tensor, plan: PrefixPlan, layer: int, scale: float) -> State | None:
    """Every row's cached prefix, tile by tile: (m, l, acc) [B, Hkv, Q(, D)], or None when no
    row has a cached token."""
    B, hkv, nq, d = qg.shape
    keys, values = plan.k[layer], plan.v[layer]                  # [S, Hkv, T + 1, D]
    out: State | None = None
    for seg in plan.segments:
        k_run = keys[seg.lo:seg.lo + seg.width]                  # [W, Hkv, T + 1, D], a view
        v_run = values[seg.lo:seg.lo + seg.width]
        if seg.direct:  # the batch is exactly this run of slots, in order
            q_run = qg
        else:
            q_run = qg.new_zeros((seg.width, hkv, nq, d))        # [W, Hkv, Q, D]
            q_run[seg.at] = qg[seg.rows]
        run: State | None = None
        for t0 in range(0, seg.tb, seg.block):
            t1 = min(t0 + seg.block, seg.tb)
            live = torch.arange(t0, t1, device=qg.device)[None, :] < seg.lens[:, None]      # [W, t]
            tile = _tile(q_run, k_run[:, :, t0:t1], v_run[:, :, t0:t1], live[:, None], scale)
            run = tile if run is None else _merge(run, tile)
        if seg.direct:
            return run
        if out is None:
            out = (qg.new_full((B, hkv, nq), float("-inf"), dtype=torch.float32),
                   qg.new_zeros((B, hkv, nq), dtype=torch.float32),
                   qg.new_zeros((B, hkv, nq, d), dtype=torch.float32))
        for full, part in zip(out, run):
            full[seg.rows] = part[seg.at]
    return out


def attend(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, new_mask: torch.Tensor | None,
    group: int, layer: int, plan: PrefixPlan | None,
) -> torch.Tensor:
    """q [B, N, H, D]; k/v_new [B, N, Hkv, D]; new_mask [B, 1, Q, N] (True = may attend, the
    same for the G query heads of a KV head), or None: each new token sees itself only (the
    candidates of a scoring step) -> [B, N, H * D]: softmax attention over the row's cached
    prefix (plan; None: no prefix) and the new keys the mask allows."""
    B, N, H, D = q.shape
    hkv = H // group
    scale = D ** -0.5
    # Query head h = kv * G + g (transformers' repeat_kv order): fold G into the query axis so
    # each KV head is read once for its G query heads, without materialising repeated K/V.
    qg = q.view(B, N, hkv, group, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, group * N, D)  # [B, Hkv, Q, D]
    k_t, v_t = k_new.transpose(1, 2), v_new.transpose(1, 2)                    # [B, Hkv, N, D]
    if new_mask is None:  # query (g, n) sees key n alone: its score, weight 1, its value
        per_query = lambda x: x[:, :, None].expand(B, hkv, group, N, D).reshape(B, hkv, group * N, D)  # noqa: E731
        s_self = (qg * per_query(k_t)).sum(-1, dtype=torch.float32) * scale   # [B, Hkv, Q]
        new: State = (s_self, torch.ones_like(s_self), per_query(v_t).float())
    else:
        new = _tile(qg, k_t, v_t, new_mask[:, 0], scale)                       # mask [B, Q, N]
    prefix = _prefix(qg, plan, layer, scale) if plan is not None else None
    _, l, acc = new if prefix is None else _merge(prefix, new)
    out = (acc / l[..., None]).to(q.dtype)                                    # [B, Hkv, Q, D]
    return out.view(B, hkv, group, N, D).permute(0, 3, 1, 2, 4).reshape(B, N, H * D)
