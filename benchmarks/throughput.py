"""Throughput of plain sampling, VAS and Best-of-N in one vLLM engine, on the same prompts.

    python -m benchmarks.throughput                       # batch 1 and 32, 4-layer value model
    python -m benchmarks.throughput --batch 1 8 32 128 --depth 2 4 8 --top-k 5 10 20 --bon 128
    # a reduced grid: depth/k sweeps (one axis at a time) only at batch 32, short warm-ups,
    # Best-of-128 timed once per batch
    python -m benchmarks.throughput --batch 1 8 32 --depth 2 4 8 --top-k 5 10 20 --bon 128 \
        --sweep-batch 32 --grid axes --warmup-tokens 4 --bon-repeats 1

One engine serves the embedded SmolLM2-135M-Instruct generator with one value model per
requested depth (its first D layers, random head: timing does not depend on the head's values).
Every configuration generates exactly --max-tokens tokens per sequence (ignore_eos) for the
same prompts, after a warm-up. Reports prompts/s and generated tokens/s, and the ratios
VAS/plain and VAS/Best-of-N, as a table and as JSON (benchmarks/results/throughput.json).
Best-of-N generates N sequences per prompt (vLLM n=N): its prompts/s is what a user gets; its
tokens/s counts all N*max_tokens tokens. Scoring the N samples by a reward is not timed here.
At batches not in --sweep-batch only the base configuration (--base-depth, --base-k) runs; with
--grid axes a sweep varies depth at the base k and k at the base depth instead of the full grid.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _value_model(gen: Path, depth: int, cache: Path) -> Path:
    from value_models.cache_build import build_once
    from value_models.checkpoint import make_value_model, randomize_score_head

    folder = cache / f"bench-value-d{depth}"

    def build(tmp: Path) -> None:
        make_value_model(gen, tmp, num_layers=depth, dtype="bfloat16")
        randomize_score_head(tmp, std=0.02, seed=depth)

    build_once(folder, build, params={"generator": str(gen), "depth": depth, "format": 1})
    return folder


def _prompts(n: int) -> list[str]:
    words = ("The film was a long story about a family that moved to the coast and found "
             "something they did not expect in the old house by the sea").split()
    return [" ".join(words[i % 7: i % 7 + 3 + i % 5]) for i in range(n)]


def _key(r: dict) -> tuple:
    """What identifies a configuration in the results."""
    return (r["method"], r["batch"], r["n"], r.get("depth"), r.get("top_k"))


def _timed(llm, prompts: list[str], params, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="prompts per generate call")
    p.add_argument("--depth", type=int, nargs="+", default=[4], help="value-model layers")
    p.add_argument("--top-k", type=int, nargs="+", default=[20], help="VAS candidates per step")
    p.add_argument("--bon", type=int, nargs="*", default=[], help="Best-of-N sizes to time")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (best kept)")
    p.add_argument("--bon-repeats", type=int, default=None,
                   help="timed runs of each Best-of-N (default: --repeats)")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help="max tokens of the untimed warm-up call (default: --max-tokens)")
    p.add_argument("--sweep-batch", type=int, nargs="*", default=None,
                   help="batches that sweep --depth x --top-k (default: all of --batch)")
    p.add_argument("--grid", choices=["full", "axes"], default="full",
                   help="full: every depth x k; axes: depths at the base k, ks at the base depth")
    p.add_argument("--base-depth", type=int, default=4, help="depth outside sweeps / of k sweeps")
    p.add_argument("--base-k", type=int, default=20, help="k outside sweeps / of depth sweeps")
    p.add_argument("--value-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="value-model dtype (auto: the generator's, bf16)")
    p.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the generator (default: eager, as the demo; the "
                   "CPU compile warm-up takes minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out (written after every configuration) "
                   "with the same --max-tokens and value dtype, and time only the missing ones")
    args = p.parse_args(argv)
    if args.base_depth not in args.depth:
        p.error(f"--base-depth {args.base_depth} must be one of --depth {args.depth}")
    if args.base_k not in args.top_k:
        p.error(f"--base-k {args.base_k} must be one of --top-k {args.top_k}")
    sweep_batches = set(args.batch if args.sweep_batch is None else args.sweep_batch)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from vas_vllm.local_engine import in_process_engine_kwargs

    layout = in_process_engine_kwargs()  # the engine in this process, on every core
    from vllm import LLM, SamplingParams

    from value_models.embedded import build_smollm2, cache_dir
    from vas_vllm import vas_engine_kwargs

    gen = build_smollm2("bfloat16")
    values = {f"d{d}": str(_value_model(gen, d, cache_dir())) for d in args.depth}
    max_batch = max(args.batch) * max([1, *args.bon])
    llm = LLM(model=str(gen), dtype="bfloat16", seed=0, max_model_len=256,
              # Best-of-N's N x batch sequences decode 512 at a time; VAS needs a value-model
              # cache slot per prompt of the largest batch only
              max_num_seqs=min(512, max_batch), kv_cache_memory_bytes=2 << 30,
              # whole prompts per step: vLLM 0.32 on CPU fails on a seeded request whose
              # prefill is chunked ("CPU Generator does not use offset")
              max_num_batched_tokens=16384, enforce_eager=not args.compile, **layout,
              **vas_engine_kwargs(values, dtype=args.value_dtype, max_top_k=max(args.top_k),
                                  max_len=256, max_concurrent=max(args.batch)))
    runs: list[dict] = []
    done: dict[tuple, dict] = {}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        if (old.get("max_tokens"), old.get("value_dtype")) == (args.max_tokens, args.value_dtype):
            done = {_key(r): r for r in old["runs"]}
            logging.info("resuming: %d configurations already in %s", len(done), args.out)

    def write() -> dict:
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "generator": "SmolLM2-135M-Instruct (bf16)", "max_tokens": args.max_tokens,
            "value_dtype": args.value_dtype, "eager": not args.compile,
            "argv": argv if argv is not None else sys.argv[1:],
            "runs": runs,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
        return result

    def run(method: str, batch: int, extra: dict | None, n: int = 1, repeats: int = args.repeats,
            **info) -> dict:
        key = _key(dict(method=method, batch=batch, n=n, **info))
        if key in done:
            runs.append(done[key])
            return done[key]
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                                seed=0, n=n, extra_args=extra)
        prompts = _prompts(batch)
        warm = params.clone()
        warm.max_tokens = args.warmup_tokens or args.max_tokens
        t0 = time.perf_counter()
        llm.generate(prompts, warm, use_tqdm=False)  # warm-up (and value-model caches)
        warm_s = time.perf_counter() - t0
        wall = _timed(llm, prompts, params, repeats)
        r = dict(method=method, batch=batch, n=n, wall_s=wall, prompts_per_s=batch / wall,
                 tokens_per_s=batch * n * args.max_tokens / wall, repeats=repeats,
                 warmup_s=warm_s, **info)
        logging.info("%s", r)
        runs.append(r)
        write()
        return r

    def vas_configs(batch: int) -> list[tuple[int, int]]:
        if batch not in sweep_batches:
            return [(args.base_depth, args.base_k)]
        if args.grid == "full":
            return [(d, k) for d in args.depth for k in args.top_k]
        cells = [(d, args.base_k) for d in args.depth] + [(args.base_depth, k) for k in args.top_k]
        return list(dict.fromkeys(cells))  # the base cell once

    for batch in args.batch:
        plain = run("plain", batch, None)
        for d, k in vas_configs(batch):
            vas = run("vas", batch, {"vas_model": f"d{d}", "vas_top_k": k, "vas_beta": 1.0},
                      depth=d, top_k=k)
            vas["vs_plain"] = vas["tokens_per_s"] / plain["tokens_per_s"]
        for n in args.bon:
            bon = run(f"best_of_{n}", batch, None, n=n, repeats=args.bon_repeats or args.repeats)
            for r in runs:
                if r["method"] == "vas" and r["batch"] == batch:
                    r[f"vs_best_of_{n}_prompts"] = r["prompts_per_s"] / bon["prompts_per_s"]

    result = write()
    bon_cols = [f"vs_best_of_{n}_prompts" for n in args.bon]
    head = ["method", "batch", "depth", "k", "prompts/s", "tokens/s", "wall s", "VAS/plain",
            *[f"VAS/Best-of-{n} prompts/s" for n in args.bon]]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in runs:
        cells = [r["method"], r["batch"], r.get("depth", ""), r.get("top_k", ""),
                 f"{r['prompts_per_s']:.3f}", f"{r['tokens_per_s']:.1f}", f"{r['wall_s']:.1f}",
                 f"{r['vs_plain']:.2f}" if "vs_plain" in r else "",
                 *[f"{r[c]:.1f}" if c in r else "" for c in bon_cols]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\nwritten {args.out}")
    return result


if __name__ == "__main__":
    main()
