"""Attention over the slot cache read in place (runtime/attention.py) against concatenated softmax.

The reference gathers each row's prefix, concatenates the new keys and runs one masked softmax:
what the runtime did before it stopped copying the prefix. The tiled, merged version must equal
it for any slots (dense, sparse, out of order), prefix lengths (including empty), tile budget
and GQA grouping; and a runtime with a budget small enough to force one-slot runs and tiles of
a few keys must still equal a full uncached transformers forward.
"""
from __future__ import annotations

import random

import pytest
import torch

from fp_bounds import RoundingTracer, assert_within
from value_reference import RUNTIME_SLACK, Float64ValueModel, make_tiny_value_model
from vas_vllm.runtime import ValueRuntime, attention
from vas_vllm.runtime.attention import MIN_BLOCK, attend, plan_prefix


@pytest.fixture(params=["fused", "unfused"])
def tile_kernel(request, monkeypatch):
    """Both ways a prefix tile is computed: torch's fused CPU flash kernel (CPU default) and
    the matmul + fp32 softmax path (what other devices run)."""
    if request.param == "fused" and not attention.FUSED_CPU:
        pytest.skip("this torch has no fused CPU flash-attention kernel")
    monkeypatch.setattr(attention, "FUSED_CPU", request.param == "fused")
    return request.param


def _index(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def _reference(q, k_new, v_new, new_mask, group, cache_k, cache_v, slots, lengths):
    """Gather + concatenate + one masked softmax, in fp64: [B, N, H * D], and the float32 error
    bound of that computation (fp_bounds: every input is an exact float32 value)."""
    B, N, H, D = q.shape
    q, k_new, v_new, cache_k, cache_v = (x.double().requires_grad_() for x in (q, k_new, v_new, cache_k, cache_v))
    tracer = RoundingTracer()
    with tracer:
        rows = []
        for b in range(B):
            n = lengths[b]
            keys = torch.cat((cache_k[slots[b], :, :n], k_new[b].transpose(0, 1)), dim=1)  # [Hkv, n + N, D]
            vals = torch.cat((cache_v[slots[b], :, :n], v_new[b].transpose(0, 1)), dim=1)
            heads = []
            for h in range(H):
                kv = h // group
                s = q[b, :, h] @ keys[kv].T * D ** -0.5                             # [N, n + N]
                allowed = torch.cat((torch.ones(N, n, dtype=torch.bool), new_mask[b, 0]), dim=1)
                p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
                heads.append(p @ vals[kv])                                          # [N, D]
            rows.append(torch.stack(heads, 1))                                      # [N, H, D]
        out = torch.stack(rows).reshape(B, N, H * D)
    return out.detach(), tracer.bound(out)


@pytest.mark.parametrize("seed", range(8))
def test_tiled_in_place_attention_equals_concatenated_softmax(seed, tile_kernel):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    group = rng.choice([1, 2, 3])
    hkv, D, S, T = rng.choice([1, 2]), rng.choice([8, 16]), 12, 70
    H = hkv * group
    B = rng.randint(1, 7)
    N = rng.choice([1, 3, 5])
    # sparse slots in any order, or (one seed in three) the batch exactly on slots 2..B+1: one
    # run read directly
    slots = list(range(2, 2 + B)) if seed % 3 == 0 else rng.sample(range(S), B)
    lengths = [rng.choice([0, 1, rng.randint(2, T)]) for _ in range(B)]
    cache_k = torch.randn(1, S, hkv, T + 1, D)           # one layer
    cache_v = torch.randn(1, S, hkv, T + 1, D)
    q, k_new, v_new = torch.randn(B, N, H, D), torch.randn(B, N, hkv, D), torch.randn(B, N, hkv, D)
    causal = rng.random() < 0.5
    base = torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.eye(N, dtype=torch.bool)
    new_mask = base.expand(B, 1, N, N)
    # a candidate step's mask (itself only) is passed as None, attend's fast path
    mask_g = None if not causal else new_mask.expand(B, group, N, N).reshape(B, 1, group * N, N)
    want, bound = _reference(q, k_new, v_new, new_mask, group, cache_k[0], cache_v[0], slots, lengths)
    for budget in (1, H * N * (D + 3), H * N * (MIN_BLOCK + D) * 3, 1 << 24):
        plan = plan_prefix(cache_k, cache_v, slots, lengths, queries=N, heads=H, head_dim=D,
                           budget=budget, index=_index)
        got = attend(q, k_new, v_new, mask_g, group, 0, plan)
        # the tiles' merged softmax against one softmax: RUNTIME_SLACK (value_reference.py)
        assert_within(got, want, RUNTIME_SLACK * bound, f"budget {budget}, slots {slots}, lengths {lengths}")


def test_plan_covers_every_row_once_and_bounds_each_tile():
    rng = random.Random(0)
    for _ in range(300):
        B = rng.randint(1, 40)
        slots = rng.sample(range(64), B)
        lengths = [rng.randint(0, 500) for _ in range(B)]
        heads, queries, D = rng.choice([2, 8]), rng.choice([1, 20, 64]), 16
        budget = rng.choice([heads * queries * (MIN_BLOCK + D), 1 << 14, 1 << 20])
        plan = plan_prefix(torch.empty(0), torch.empty(0), slots, lengths, queries=queries,
                           heads=heads, head_dim=D, budget=budget, index=_index)
        covered = [r for seg in plan.segments for r in seg.rows.tolist()]
        assert len(covered) == len(set(covered)), "a row is in two runs"
        missing = [b for b in range(B) if lengths[b] and b not in covered]
        assert not missing, f"rows {missing} have cached tokens but are in no run"
        for seg in plan.segments:
            rows = seg.rows.tolist()
            assert 2 * len(rows) >= seg.width or len(rows) == 1, "a run is more than half waste"
            assert [slots[r] - seg.lo for r in rows] == seg.at.tolist()
            assert seg.tb == max(lengths[r] for r in rows) and 1 <= seg.block <= seg.tb
            tile = seg.width * heads * queries * (min(seg.block, seg.tb) + D)
            assert tile <= budget or seg.width == 1, (tile, budget, seg)


def test_runtime_with_one_slot_runs_and_small_tiles_is_exact(tmp_path, tile_kernel):
    """A budget that allows one slot per run and tiles of ~10 keys, sparse slots, commits."""
    make_tiny_value_model(tmp_path, seed=7, heads=4, kv_heads=2)
    model = Float64ValueModel(tmp_path)
    K = 5
    budget = 4 * K * (16 + 10)  # H * Q * (D + 10): tiles of 10 keys, one slot per run
    rt = ValueRuntime.from_pretrained(tmp_path, max_slots=12, max_len=90, max_candidates=K,
                                      verify_tokens=True, attn_budget=budget, prefill_chunk=8,
                                      prefill_tokens=16)
    rng = random.Random(1)
    taken = [rt.allocate() for _ in range(12)]
    for s in taken[1::3]:
        rt.release(s)  # gaps between the slots in use
    slots = [s for s in taken if s in rt.cache.used_slots]
    rng.shuffle(slots)
    hists = [[rng.randrange(101) for _ in range(rng.randint(1, 60))] for _ in slots]
    for _ in range(3):
        cands = torch.tensor([rng.sample(range(101), K) for _ in slots])    # [B, K]
        values = rt.score(slots, hists, cands)
        for b, hist in enumerate(hists):
            want, bound, _, _ = model.bounded(hist, cands[b].tolist(), None)
            assert_within(values[b], want[:, 0], RUNTIME_SLACK * bound[:, 0], f"row {b}")
            hist.append(cands[b, rng.randrange(K)].item())
    assert rt.stats["commits"] == 2 * len(slots)
