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
        segments.append(Segment(lo=lo, width=width, tb=tb, block=block, rows=index(run),
                                at=index([slots[b] - lo for b in run]), lens=index(lens)))
    return PrefixPlan(k=k, v=v, segments=tuple(segments))


def _fold(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
    """Online-softmax update in place: fold scores s [.., Q, T] (fp32, -inf = masked) over
    values v [.., T, D] into the running max m [.., Q], sum l [.., Q] and acc [.., Q, D]."""
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)    # rows that have seen no key yet
    p = torch.exp(s - m_safe[..., None])                        # [.., Q, T]
    corr = torch.exp(m - m_safe)                                # [.., Q]
    l.mul_(corr).add_(p.sum(-1))
    acc.mul_(corr[..., None]).add_(torch.matmul(p.to(v.dtype), v).float())
    m.copy_(m_new)


def _prefix(qg: torch.Tensor, plan: PrefixPlan, layer: int, scale: float,
            m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> None:
    """Fold every row's cached prefix into (m, l, acc) [B, Hkv, Q(, D)], tile by tile."""
    _, hkv, nq, d = qg.shape
    keys, values = plan.k[layer], plan.v[layer]                  # [S, Hkv, T + 1, D]
    for seg in plan.segments:
        k_run = keys[seg.lo:seg.lo + seg.width]                  # [W, Hkv, T + 1, D], a view
        v_run = values[seg.lo:seg.lo + seg.width]
        q_run = qg.new_zeros((seg.width, hkv, nq, d))            # [W, Hkv, Q, D]
        q_run[seg.at] = qg[seg.rows]
        m_run = m.new_full((seg.width, hkv, nq), float("-inf"))  # [W, Hkv, Q]
        l_run = l.new_zeros((seg.width, hkv, nq))
        acc_run = acc.new_zeros((seg.width, hkv, nq, d))         # [W, Hkv, Q, D]
        for t0 in range(0, seg.tb, seg.block):
            t1 = min(t0 + seg.block, seg.tb)
            s = torch.matmul(q_run, k_run[:, :, t0:t1].transpose(-1, -2)).float().mul_(scale)  # [W, Hkv, Q, t]
            live = torch.arange(t0, t1, device=s.device)[None, :] < seg.lens[:, None]       # [W, t]
            s.masked_fill_(~live[:, None, None, :], float("-inf"))
            _fold(m_run, l_run, acc_run, s, v_run[:, :, t0:t1])
        m[seg.rows], l[seg.rows], acc[seg.rows] = m_run[seg.at], l_run[seg.at], acc_run[seg.at]


def attend(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, new_mask: torch.Tensor,
    group: int, layer: int, plan: PrefixPlan | None,
) -> torch.Tensor:
    """q [B, N, H, D]; k/v_new [B, N, Hkv, D]; new_mask [B, 1, Q, N] (True = may attend, the
    same for the G query heads of a KV head) -> [B, N, H * D]: softmax attention over the
    row's cached prefix (plan; None: no prefix) and the new keys the mask allows."""
    B, N, H, D = q.shape
    hkv = H // group
    scale = D ** -0.5
    # Query head h = kv * G + g (transformers' repeat_kv order): fold G into the query axis so
    # each KV head is read once for its G query heads, without materialising repeated K/V.
    qg = q.view(B, N, hkv, group, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, group * N, D)  # [B, Hkv, Q, D]
    m = q.new_full((B, hkv, group * N), float("-inf"), dtype=torch.float32)  # [B, Hkv, Q]
    l = torch.zeros_like(m)
    acc = q.new_zeros((B, hkv, group * N, D), dtype=torch.float32)            # [B, Hkv, Q, D]
    if plan is not None:
        _prefix(qg, plan, layer, scale, m, l, acc)
    s = torch.matmul(qg, k_new.permute(0, 2, 3, 1)).float().mul_(scale)      # [B, Hkv, Q, N]
    s.masked_fill_(~new_mask, float("-inf"))
    _fold(m, l, acc, s, v_new.transpose(1, 2))
    out = (acc / l[..., None]).to(q.dtype)                                    # [B, Hkv, Q, D]
    return out.view(B, hkv, group, N, D).permute(0, 3, 1, 2, 4).reshape(B, N, H * D)
