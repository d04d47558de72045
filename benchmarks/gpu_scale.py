"""Value scoring vs a 7B generator's decode step at real shapes, on one GPU, without vLLM.

Measured per (batch B, prefix P), with random weights built in memory (no files, no downloads):
- value:     one steady-state VAS step of vas_vllm's ValueRuntime for a TinyLlama-1.1B-shaped
             value model (22 layers, hidden 2048, 32 heads / 4 KV heads, MLP 5632, vocab 32000):
             commit the candidate sampled at the previous step into the cache (commit-on-accept,
             no forward), then one forward scoring K candidates per row against the row's cached
             P-token prefix (`ValueRuntime.score` = sync + score_candidates).
- (g):       the same with CUDA graphs (CUDA only): the value step's candidate forward captured
             once and replayed (the forward alone: no commit, no host bookkeeping, prefix fixed
             at capture; the runtime itself runs eager), and the generator step replayed as
             vLLM replays its decode steps.
- generator: the reference cost, one plain-torch decode step of a Llama-2-7B-shaped generator
             (32 layers, hidden 4096, 32 heads, MLP 11008, vocab 32000): one token per row
             attending to a preallocated KV cache of P tokens, LM head included. Cells whose
             memory need exceeds the free device memory are skipped, with the reason.
Reported: ms per step (median of --steps after --warmup), the value/generator ratio (eager vs
eager, the one the target is judged on; (g) vs (g) and eager value vs (g) generator too), FLOP
rates, and the bandwidth each step achieves (the bytes it must move, each once: weights, KV read,
K/V written) against the card's device-to-device copy bandwidth (read + write bytes of a large
copy), both per second.

The value cache is filled either directly with random K/V (`--fill direct`, the default: the
timing does not depend on the values; the script then sets each slot's cached length, the one
runtime internal it writes) or by the runtime's own catch-up forward over random histories
(`--fill sync`: real, slower). A cheap correctness check runs first: the runtime's cached values
(chunked catch-up, commit-on-accept, candidate scoring) against an uncached `run_layers` forward
of every full sequence, and the generator's cached decode step against an uncached forward; in
fp32 at tiny shapes and in the benchmark dtype at the benchmark shapes.

Run on the GPU machine (this repo's files and torch only; see scripts/run_gpu_scale.sh):
    PYTHONPATH=. python -m benchmarks.gpu_scale --device cuda
    PYTHONPATH=. python -m benchmarks.gpu_scale --batch 64 --prefix 1024   # the target cell only
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gpu_scale --tiny --device cpu   # seconds, CPU
Prints a markdown table; `--out FILE` also writes the JSON (scripts/run_gpu_scale.sh writes
benchmarks/results/gpu_scale.json). Target (issue E): value
scoring costs at most 25% of the 7B decode step at batch 64 and context 1024.

Shape key: B rows, K candidates, P cached prefix, T cache length, L layers, H query heads,
Hkv KV heads, D head dim, Hid hidden size, I MLP size, V vocabulary.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_models import (
    GENERATOR_SHAPE,
    TINY_GENERATOR_SHAPE,
    TINY_VALUE_SHAPE,
    VALUE_SHAPE,
    GeneratorWeights,
    decode_step,
    generator_cell_bytes,
    kv_token_bytes,
    layers_bytes,
    random_generator_weights,
    random_value_weights,
    step_flops,
    tensor_bytes,
    value_cell_bytes,
)
from benchmarks.gpu_scale_checks import check_decode_step, check_value_runtime
from vas_vllm.runtime import LlamaSpec, ValueRuntime, ValueWeights
from vas_vllm.runtime.attention import plan_prefix
from vas_vllm.runtime.forward import run_layers

logger = logging.getLogger("benchmarks.gpu_scale")
RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1024 ** 3
HEADROOM = GiB  # left free for the allocator's slack and the CUDA context's growth
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


TARGET = {"batch": 64, "prefix": 1024, "max_ratio": 0.25}


def free_bytes(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _skip_reason(need: int, device: torch.device) -> str | None:
    free = free_bytes(device)
    if need + HEADROOM <= free:
        return None
    return f"needs {need / GiB:.1f} GiB (+{HEADROOM / GiB:.0f} GiB headroom), {free / GiB:.1f} GiB free"


# ---- timing ------------------------------------------------------------------------------------
def time_steps(step: Callable[[int], object], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Run step(0), ..., step(warmup + steps - 1); return the ms of each of the last `steps`.

    CUDA: an event pair around each step, so time the GPU sat idle waiting for the host inside
    a step (launch overhead, host syncs) counts, and work queued before the step does not.
    """
    for i in range(warmup):
        step(i)
    if device.type != "cuda":
        out = []
        for i in range(warmup, warmup + steps):
            t0 = time.perf_counter()
            step(i)
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for i, (start, end) in enumerate(events):
        start.record()
        step(warmup + i)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def copy_bandwidth_gbps(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Read + write bytes per second of a device-to-device copy of `nbytes`."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_steps(lambda _: dst.copy_(src), 2, repeats, device))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---- the value step ----------------------------------------------------------------------------
def fill_cache_directly(rt: ValueRuntime, slots: list[int], prefix: int, seed: int) -> None:
    """Random K/V everywhere in the cache, and books saying each slot holds `prefix` tokens."""
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    rt.cache.k.normal_(generator=gen)  # [L, S, Hkv, T + 1, D]
    rt.cache.v.normal_(generator=gen)
    for slot in slots:
        rt.cache.slots[slot].length = prefix


def static_candidate_forward(rt: ValueRuntime, slots: list[int], candidates: torch.Tensor) -> Callable[[], torch.Tensor]:
    """score_candidates' forward with every input prebuilt for the cache as it is now (fixed
    lengths): the part a CUDA graph can capture. Writes the same pending K/V; () -> [B, K] fp32."""
    B, K = candidates.shape
    dev, c = rt.device, rt.cache
    lengths = [rt.cached_len(s) for s in slots]
    slots_t = torch.tensor(slots, device=dev)                                  # [B]
    tokens = candidates.clone()                                                # [B, K]
    positions = torch.tensor(lengths, device=dev)[:, None].expand(B, K).contiguous()  # [B, K]
    plan = plan_prefix(c.k, c.v, slots, lengths, queries=K, heads=rt.spec.num_heads,
                       head_dim=rt.spec.head_dim, budget=rt.attn_budget,
                       index=lambda xs: torch.tensor(list(xs), dtype=torch.long, device=dev))

    def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:          # k, v [B, K, Hkv, D]
        c.pending_k[layer][slots_t, :K] = k
        c.pending_v[layer][slots_t, :K] = v

    def forward() -> torch.Tensor:
        return run_layers(rt.spec, rt.weights, rt.inv_freq, tokens, positions, None, plan, sink)  # self only
    return forward


def time_graph(fn: Callable[[], torch.Tensor], warmup: int, steps: int,
               device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Capture fn() once in a CUDA graph; return the ms of each timed replay and its static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (cuBLAS workspaces, lazy init) off the capture stream
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    ms = time_steps(lambda _: graph.replay(), warmup, steps, device)
    torch.cuda.synchronize(device)
    return ms, out


def _try_graph(row: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        row.update(fn())
    except Exception as exc:  # optional measurement: report it, keep the rest of the cell
        logger.warning("CUDA graph (%s) failed: %r", key, exc)
        row[f"{key}_graph_error"] = repr(exc)[:300]


def bench_value_graph(rt: ValueRuntime, slots: list[int], candidates: torch.Tensor, warmup: int,
                      steps: int) -> dict[str, Any]:
    eager = rt.score_candidates(slots, candidates)                             # [B, K], same cache
    ms, out = time_graph(static_candidate_forward(rt, slots, candidates), warmup, steps, rt.device)
    return {"value_graph_ms": statistics.median(ms), "graph_max_abs_diff": (out - eager).abs().max().item()}


def bench_value_cell(spec: LlamaSpec, weights: ValueWeights, *, batch: int, prefix: int, k: int, warmup: int,
                     steps: int, fill: str, graphs: bool, seed: int, device: torch.device,
                     dtype: torch.dtype) -> dict[str, Any]:
    n = warmup + steps
    rt = ValueRuntime(spec, weights, max_slots=batch, max_len=prefix + n + 1, max_candidates=k,
                      device=device, dtype=dtype)
    slots = [rt.allocate() for _ in range(batch)]
    gen = torch.Generator().manual_seed(seed)
    hists = torch.randint(0, spec.vocab_size, (batch, prefix), generator=gen).tolist()
    if fill == "direct":
        fill_cache_directly(rt, slots, prefix, seed)
    else:
        rt.sync(slots, hists)  # the runtime's catch-up forward: not part of the per-step cost
    # Every step's candidates and sampled choices are drawn up front: only scoring is timed.
    cands = torch.randint(0, spec.vocab_size, (n, batch, k), generator=gen)   # [n, B, K]
    picks = torch.randint(0, k, (n, batch, 1), generator=gen)                  # [n, B, 1]
    accepted = cands.gather(2, picks).squeeze(2).tolist()                      # [n][B]
    cands_dev = cands.to(device)

    def step(i: int) -> None:
        if i:  # each row sampled one of the candidates scored last step: a commit, no forward
            for hist, token in zip(hists, accepted[i - 1]):
                hist.append(token)
        rt.score(slots, hists, cands_dev[i])

    ms = time_steps(step, warmup, steps, device)
    if rt.stats["commits"] != batch * (n - 1):
        raise RuntimeError(f"expected {batch * (n - 1)} commits-on-accept, runtime stats say {rt.stats}")
    row: dict[str, Any] = {"value_ms": statistics.median(ms)}
    if graphs:
        _try_graph(row, "value", lambda: bench_value_graph(rt, slots, cands_dev[n - 1], warmup, steps))
    return row


def bench_generator_cell(spec: LlamaSpec, w: GeneratorWeights, *, batch: int, prefix: int, warmup: int,
                         steps: int, graphs: bool, seed: int, device: torch.device,
                         dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (spec.num_layers, batch, spec.num_kv_heads, prefix + 1, spec.head_dim)
    k_cache = torch.empty(shape, device=device, dtype=dtype).normal_(generator=gen)  # [L, B, Hkv, P + 1, D]
    v_cache = torch.empty(shape, device=device, dtype=dtype).normal_(generator=gen)
    tokens = torch.randint(0, spec.vocab_size, (batch,), device=device, generator=gen)  # [B]
    inv_freq = spec.inv_freq().to(device)
    step = lambda: decode_step(spec, w, inv_freq, tokens, prefix, k_cache, v_cache)  # noqa: E731
    row: dict[str, Any] = {"gen_ms": statistics.median(time_steps(lambda _: step(), warmup, steps, device))}
    if graphs:  # what vLLM does for decode steps: one graph per batch size
        _try_graph(row, "gen", lambda: {"gen_graph_ms": statistics.median(time_graph(step, warmup, steps, device)[0])})
    return row


# ---- driver ------------------------------------------------------------------------------------
def _value_phase(args: argparse.Namespace, spec: LlamaSpec, cells: list[dict[str, Any]], checks: list[dict],
                 device: torch.device, dtype: torch.dtype) -> int:
    weights = random_value_weights(spec, device=device, dtype=dtype, seed=args.seed)
    weight_bytes = layers_bytes(weights.layers) + tensor_bytes(weights.norm, weights.score_w)
    checks.append(check_value_runtime(spec, weights, k=args.k, device=device, dtype=dtype, seed=args.seed))
    elsize, graphs = dtype.itemsize, args.graphs
    for cell in cells:
        B, P, n = cell["batch"], cell["prefix"], args.warmup + args.steps
        reason = _skip_reason(value_cell_bytes(spec, B, P + n + 1, args.k, elsize), device)
        if reason:
            cell["value_skipped"] = reason
            logger.info("value B=%d P=%d: skipped (%s)", B, P, reason)
            continue
        logger.info("value B=%d P=%d K=%d ...", B, P, args.k)
        try:
            cell.update(bench_value_cell(spec, weights, batch=B, prefix=P, k=args.k, warmup=args.warmup,
                                         steps=args.steps, fill=args.fill, graphs=graphs, seed=args.seed,
                                         device=device, dtype=dtype))
        except torch.cuda.OutOfMemoryError as exc:
            cell["value_skipped"] = f"out of memory: {str(exc)[:200]}"
            continue
        graphs = graphs and "value_graph_error" not in cell  # one failure is enough to know
        ctx = P + args.warmup + (args.steps - 1) / 2                           # mean cached length timed
        cell["value_bytes"] = (weight_bytes + B * args.k * spec.hidden_size * elsize     # weights, embedding rows
                               + kv_token_bytes(spec, elsize) * B * (ctx + args.k + 2))  # KV read, pending, commit
        cell["value_flops"] = step_flops(spec, B * args.k, ctx + 1, 1)
    return weight_bytes


def _generator_phase(args: argparse.Namespace, spec: LlamaSpec, cells: list[dict[str, Any]], checks: list[dict],
                     device: torch.device, dtype: torch.dtype) -> int:
    weights = random_generator_weights(spec, device=device, dtype=dtype, seed=args.seed + 1)
    weight_bytes = layers_bytes(weights.layers) + tensor_bytes(weights.norm, weights.lm_head)
    checks.append(check_decode_step(spec, weights, device=device, dtype=dtype, seed=args.seed))
    elsize, graphs = dtype.itemsize, args.graphs
    for cell in cells:
        B, P = cell["batch"], cell["prefix"]
        reason = _skip_reason(generator_cell_bytes(spec, B, P, elsize), device)
        if reason:
            cell["gen_skipped"] = reason
            logger.info("generator B=%d P=%d: skipped (%s)", B, P, reason)
            continue
        logger.info("generator B=%d P=%d ...", B, P)
        try:
            cell.update(bench_generator_cell(spec, weights, batch=B, prefix=P, warmup=args.warmup, steps=args.steps,
                                             graphs=graphs, seed=args.seed, device=device, dtype=dtype))
        except torch.cuda.OutOfMemoryError as exc:
            cell["gen_skipped"] = f"out of memory: {str(exc)[:200]}"
            continue
        graphs = graphs and "gen_graph_error" not in cell
        cell["gen_bytes"] = weight_bytes + B * spec.hidden_size * elsize + kv_token_bytes(spec, elsize) * B * (P + 1)
        cell["gen_flops"] = step_flops(spec, B, P + 1, spec.vocab_size)
    return weight_bytes


def _derive(cell: dict[str, Any]) -> None:
    """Bandwidths (GB/s), TFLOP/s and the value/generator ratios of one cell, from what ran."""
    for who in ("value", "gen"):
        for mode in ("", "_graph"):
            ms = cell.get(f"{who}{mode}_ms")
            if ms is not None and f"{who}_bytes" in cell:
                cell[f"{who}{mode}_gbps"] = cell[f"{who}_bytes"] / (ms * 1e-3) / 1e9
                cell[f"{who}{mode}_tflops"] = cell[f"{who}_flops"] / (ms * 1e-3) / 1e12
    pairs = {"ratio": ("value_ms", "gen_ms"), "graph_ratio": ("value_graph_ms", "gen_graph_ms"),
             "ratio_vs_gen_graph": ("value_ms", "gen_graph_ms")}
    for name, (num, den) in pairs.items():
        if num in cell and den in cell:
            cell[name] = cell[num] / cell[den]


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / GiB, cuda=torch.version.cuda)
    return info


def _fmt(cell: dict[str, Any], key: str, spec: str) -> str:
    return format(cell[key], spec) if key in cell else "-"


def print_table(result: dict[str, Any]) -> None:
    cfg, copy = result["config"], result["copy_gbps"]
    vs, gs = cfg["value_shape"], cfg["generator_shape"]
    print(f"\nValue step ({vs['num_hidden_layers']} layers, hidden {vs['hidden_size']}, K={cfg['k']}) vs generator "
          f"decode step ({gs['num_hidden_layers']} layers, hidden {gs['hidden_size']}), {cfg['dtype']}, "
          f"{result['machine'].get('gpu', 'cpu')}; copy bandwidth {copy:.4g} GB/s (read + write). "
          "(g) = CUDA graph.\n")
    print("| batch | prefix | value ms | value ms (g) | gen ms | gen ms (g) | value/gen | (g)/(g) "
          "| value GB/s | of copy BW | value (g) GB/s | value TFLOP/s | gen GB/s |")
    print("|" + "---:|" * 13)
    for c in result["rows"]:
        frac = f"{c['value_gbps'] / copy:.0%}" if "value_gbps" in c else "-"
        print(f"| {c['batch']} | {c['prefix']} | {_fmt(c, 'value_ms', '.3f')} | {_fmt(c, 'value_graph_ms', '.3f')} "
              f"| {_fmt(c, 'gen_ms', '.3f')} | {_fmt(c, 'gen_graph_ms', '.3f')} | {_fmt(c, 'ratio', '.3f')} "
              f"| {_fmt(c, 'graph_ratio', '.3f')} | {_fmt(c, 'value_gbps', '.4g')} | {frac} "
              f"| {_fmt(c, 'value_graph_gbps', '.4g')} | {_fmt(c, 'value_tflops', '.3g')} | {_fmt(c, 'gen_gbps', '.4g')} |")
    for c in result["rows"]:
        for key in ("value_skipped", "gen_skipped", "value_graph_error", "gen_graph_error"):
            if key in c:
                print(f"- B={c['batch']} P={c['prefix']} {key}: {c[key]}")
    for chk in result["correctness"]:
        print(f"- check: {chk['what']} ({chk['layers']} layers, hidden {chk['hidden']}, {chk['dtype']}): "
              f"max |err| {chk['max_abs_err']:.2e} (values up to {chk['max_abs_value']:.2f})")
    t = result["target"]
    if t["met"] is None:
        verdict = "not run (needs that cell, at the full shapes, with both steps run)"
    else:
        others = ", ".join(f"{k} {t[k]:.3f}" for k in ("graph_ratio", "ratio_vs_gen_graph") if t.get(k) is not None)
        verdict = f"{'met' if t['met'] else 'NOT met'}: value/gen {t['ratio']:.3f}" + (f" ({others})" if others else "")
    print(f"- target, value scoring <= {t['max_ratio']:.0%} of the 7B step at batch {t['batch']}, "
          f"context {t['prefix']} (eager vs eager): {verdict}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (2 layers, hidden 64): seconds on CPU")
    p.add_argument("--batch", type=int, nargs="+", help="rows (default 1 8 32 64 128 256; tiny 1 4)")
    p.add_argument("--prefix", type=int, nargs="+", help="cached tokens (default 128 512 1024 2048; tiny 16 48)")
    p.add_argument("--k", type=int, default=20, help="candidates per row (default 20)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--warmup", type=int, help="untimed steps per cell (default 3; tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps per cell, median reported (default 10; tiny 3)")
    p.add_argument("--fill", choices=["direct", "sync"], default="direct",
                   help="value cache: random K/V written directly, or the runtime's catch-up forward")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip the CUDA-graph timings (value forward, generator step)")
    p.add_argument("--copy-mib", type=int, help="size of the bandwidth copy (default 1024; tiny 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"write the JSON here (e.g. {RESULTS / 'gpu_scale.json'}); default: print only")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or ([1, 4] if tiny else [1, 8, 32, 64, 128, 256])
    args.prefix = args.prefix or ([16, 48] if tiny else [128, 512, 1024, 2048])
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.steps = args.steps or (3 if tiny else 10)
    args.copy_mib = args.copy_mib or (64 if tiny else 1024)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.graphs = args.graphs and device.type == "cuda"
    value_cfg, gen_cfg = (TINY_VALUE_SHAPE, TINY_GENERATOR_SHAPE) if tiny else (VALUE_SHAPE, GENERATOR_SHAPE)
    value_spec = LlamaSpec.from_config_dict(value_cfg, source="value shape")
    gen_spec = LlamaSpec.from_config_dict(gen_cfg, source="generator shape")
    cells: list[dict[str, Any]] = [{"batch": b, "prefix": pr, "k": args.k} for pr in args.prefix for b in args.batch]
    checks: list[dict[str, Any]] = []

    with torch.inference_mode():
        copy_gbps = copy_bandwidth_gbps(device, args.copy_mib * 2 ** 20)
        logger.info("copy bandwidth %.0f GB/s (read + write)", copy_gbps)
        tiny_value, tiny_gen = (LlamaSpec.from_config_dict(c) for c in (TINY_VALUE_SHAPE, TINY_GENERATOR_SHAPE))
        checks.append(check_value_runtime(tiny_value, random_value_weights(tiny_value, device=device,
                      dtype=torch.float32, seed=args.seed), k=args.k, device=device, dtype=torch.float32))
        checks.append(check_decode_step(tiny_gen, random_generator_weights(tiny_gen, device=device,
                      dtype=torch.float32, seed=args.seed), device=device, dtype=torch.float32))
        value_weight_bytes = _value_phase(args, value_spec, cells, checks, device, dtype)
        free_bytes(device)  # drop the value model before the generator's weights arrive
        gen_weight_bytes = _generator_phase(args, gen_spec, cells, checks, device, dtype)

    for cell in cells:
        _derive(cell)
    at = next((c for c in cells if (c["batch"], c["prefix"]) == (TARGET["batch"], TARGET["prefix"])), {})
    at = {} if tiny else at
    ratio = at.get("ratio")
    result = {
        "machine": _machine(device),
        "config": {"value_shape": value_cfg, "generator_shape": gen_cfg, "k": args.k, "dtype": args.dtype,
                   "warmup": args.warmup, "steps": args.steps, "fill": args.fill, "graphs": args.graphs,
                   "tiny": tiny, "value_weight_bytes": value_weight_bytes, "gen_weight_bytes": gen_weight_bytes},
        "copy_gbps": copy_gbps,
        "correctness": checks,
        "rows": cells,
        "target": {**TARGET, "ratio": ratio, "graph_ratio": at.get("graph_ratio"),
                   "ratio_vs_gen_graph": at.get("ratio_vs_gen_graph"),
                   "met": None if ratio is None else ratio <= TARGET["max_ratio"]},
    }
    print_table(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
