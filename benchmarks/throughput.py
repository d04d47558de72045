"""Throughput of plain sampling, VAS and Best-of-N in one vLLM engine, on the same prompts.

    python -m benchmarks.throughput                       # batch 1 and 32, 4-layer value model
    python -m benchmarks.throughput --batch 1 8 32 128 --depth 2 4 8 --top-k 5 10 20 --bon 128

One engine serves the embedded SmolLM2-135M-Instruct generator with one value model per
requested depth (its first D layers, random head: timing does not depend on the head's values).
Every configuration generates exactly --max-tokens tokens per sequence (ignore_eos) for the
same prompts, after a warm-up. Reports prompts/s and generated tokens/s, and the ratios
VAS/plain and VAS/Best-of-N, as a table and as JSON (benchmarks/results/throughput.json).
Best-of-N generates N sequences per prompt (vLLM n=N): its prompts/s is what a user gets; its
tokens/s counts all N*max_tokens tokens. Scoring the N samples by a reward is not timed here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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
    p.add_argument("--value-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="value-model dtype (auto: the generator's, bf16)")
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from vllm import LLM, SamplingParams

    from value_models.embedded import build_smollm2, cache_dir
    from vas_vllm import vas_engine_kwargs

    gen = build_smollm2("bfloat16")
    values = {f"d{d}": str(_value_model(gen, d, cache_dir())) for d in args.depth}
    max_batch = max(args.batch) * max([1, *args.bon])
    llm = LLM(model=str(gen), dtype="bfloat16", seed=0, max_model_len=256,
              max_num_seqs=min(256, max_batch), kv_cache_memory_bytes=2 << 30,
              **vas_engine_kwargs(values, dtype=args.value_dtype, max_top_k=max(args.top_k),
                                  max_len=256))
    runs = []

    def run(method: str, batch: int, extra: dict | None, n: int = 1, **info) -> dict:
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                                seed=0, n=n, extra_args=extra)
        prompts = _prompts(batch)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up (and value-model caches)
        wall = _timed(llm, prompts, params, args.repeats)
        r = dict(method=method, batch=batch, n=n, wall_s=wall, prompts_per_s=batch / wall,
                 tokens_per_s=batch * n * args.max_tokens / wall, **info)
        logging.info("%s", r)
        runs.append(r)
        return r

    for batch in args.batch:
        plain = run("plain", batch, None)
        for d in args.depth:
            for k in args.top_k:
                vas = run("vas", batch, {"vas_model": f"d{d}", "vas_top_k": k, "vas_beta": 1.0},
                          depth=d, top_k=k)
                vas["vs_plain"] = vas["tokens_per_s"] / plain["tokens_per_s"]
        for n in args.bon:
            bon = run(f"best_of_{n}", batch, None, n=n)
            for r in runs:
                if r["method"] == "vas" and r["batch"] == batch:
                    r[f"vs_best_of_{n}_prompts"] = r["prompts_per_s"] / bon["prompts_per_s"]

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "generator": "SmolLM2-135M-Instruct (bf16)", "max_tokens": args.max_tokens,
        "value_dtype": args.value_dtype, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| method | batch | depth | k | prompts/s | tokens/s | VAS/plain |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['method']} | {r['batch']} | {r.get('depth', '')} | {r.get('top_k', '')} | "
              f"{r['prompts_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['vs_plain']:.2f} |" if "vs_plain" in r else
              f"| {r['method']} | {r['batch']} | | | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.1f} | |")
    print(f"\nwritten {args.out}")
    return result


if __name__ == "__main__":
    main()
