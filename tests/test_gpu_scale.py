"""benchmarks/gpu_scale.py at tiny shapes on CPU: it runs, its JSON is complete, its checks pass.

The GPU numbers come from running the script on a GPU host (scripts/run_gpu_scale.sh); here the
same code paths run at 2 layers / hidden 64 so a broken script is caught before it reaches one.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch

from benchmarks import gpu_scale
from vas_vllm.runtime import LlamaSpec, ValueRuntime


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Many tiny ops: on 2 shared cores, OpenMP threads spinning against each other cost 100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("fill", ["direct", "sync"])
def test_tiny_run_writes_complete_json(tmp_path, capsys, one_thread, fill):
    out = tmp_path / "gpu_scale.json"
    result = gpu_scale.main(["--tiny", "--device", "cpu", "--fill", fill, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result)), "the JSON written differs from the result returned"
    assert {"machine", "config", "copy_gbps", "correctness", "rows", "target"} <= saved.keys()
    assert _positive(saved["copy_gbps"]), f"copy bandwidth {saved['copy_gbps']!r}"
    cells = {(r["batch"], r["prefix"]) for r in saved["rows"]}
    assert cells == {(b, p) for b in (1, 4) for p in (16, 48)}, f"unexpected grid {sorted(cells)}"
    for row in saved["rows"]:
        assert not {"value_skipped", "gen_skipped"} & row.keys(), f"tiny cell skipped: {row}"
        for key in ("value_ms", "gen_ms", "ratio", "value_gbps", "value_tflops", "gen_gbps"):
            assert _positive(row.get(key)), f"B={row['batch']} P={row['prefix']}: {key} = {row.get(key)!r}"
        assert row["ratio"] == pytest.approx(row["value_ms"] / row["gen_ms"])  # the same float64 division
        assert "value_graph_ms" not in row, "CUDA graphs must be off on CPU"
    # fp32 at tiny shapes: the cached runtime and decode step equal the uncached forward.
    fp32 = [c for c in saved["correctness"] if c["dtype"] == "float32"]
    assert len(fp32) == 2 and len(saved["correctness"]) == 4, saved["correctness"]
    for check in fp32:
        # a sanity check of the benchmark's own report (its exactness is tests/test_runtime.py's, with
        # derived bounds); ~100x the float32 error of O(1) values at these tiny shapes
        assert check["max_abs_err"] < 1e-4, f"{check['what']}: max |err| {check['max_abs_err']:.2e}"
        assert check["max_abs_value"] > 0.1, f"{check['what']}: degenerate values {check['max_abs_value']}"
    for check in saved["correctness"]:  # bf16: rounding only
        assert check["max_abs_err"] < 0.1 * max(1.0, check["max_abs_value"]), check
    assert saved["target"]["met"] is None, "the target only applies at the full shapes"
    printed = capsys.readouterr().out
    assert "| batch | prefix | value ms |" in printed and "- target" in printed


def test_static_candidate_forward_matches_score_candidates(one_thread):
    """The inputs built for CUDA-graph capture reproduce score_candidates exactly (eager, on CPU)."""
    spec = LlamaSpec.from_config_dict(gpu_scale.TINY_VALUE_SHAPE)
    weights = gpu_scale.random_value_weights(spec, device=torch.device("cpu"), dtype=torch.float32, seed=1)
    rt = ValueRuntime(spec, weights, max_slots=4, max_len=32, max_candidates=5)
    gen = torch.Generator().manual_seed(0)
    slots = [rt.allocate() for _ in range(3)]
    rt.sync(slots, [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist() for n in (3, 12, 7)])
    cands = torch.randint(0, spec.vocab_size, (3, 5), generator=gen)       # [B, K]
    expected = rt.score_candidates(slots, cands)                            # [B, K]
    pending = rt.cache.pending_k.clone()
    rt.cache.pending_k.zero_()
    got = gpu_scale.static_candidate_forward(rt, slots, cands)()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)   # the same ops on the same inputs: bitwise
    torch.testing.assert_close(rt.cache.pending_k, pending, atol=0, rtol=0)


def test_memory_plan_skips_what_cannot_fit():
    spec = LlamaSpec.from_config_dict(gpu_scale.GENERATOR_SHAPE)
    # Llama-2-7B KV cache: 32 layers * 2 * 4096 * 2 bytes = 512 KiB per token.
    assert gpu_scale.kv_token_bytes(spec, 2) == 32 * 2 * 4096 * 2
    need = gpu_scale.generator_cell_bytes(spec, 256, 2048, 2)
    assert need > 256 * 2049 * 512 * 1024, f"batch 256 x 2048 needs at least 275 GB, planned {need}"
    reason = gpu_scale._skip_reason(need, torch.device("cpu"))
    assert reason is not None and "GiB free" in reason, reason
    assert gpu_scale._skip_reason(1, torch.device("cpu")) is None
