"""Plain decoding speed of the embedded generator in bfloat16 and float32, one engine per dtype.

    .venv/bin/python -m benchmarks.dtype_speed            # 32 prompts x 8 samples x 32 tokens

On a CPU without AVX-512 bf16, vLLM's bf16 linear layers fall back to torch ("Failed to create
oneDNN linear"), which is what makes `make demo` slow there (README, The two commands).
"""
from __future__ import annotations

import sys
import time


def rate(generator: str, dtype: str) -> float:
    from vllm import LLM, SamplingParams

    llm = LLM(model=generator, dtype=dtype, max_model_len=256, seed=0, enforce_eager=True, max_num_seqs=256,
              max_num_batched_tokens=32768, kv_cache_memory_bytes=1 << 30, block_size=32)
    prompts = [f"Tell me about day {i} of my trip" for i in range(32)]
    params = SamplingParams(n=8, max_tokens=32, temperature=1.0, seed=0)
    llm.generate(prompts[:2], params, use_tqdm=False)   # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(f"{dtype}: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.0f} tokens/s", flush=True)
    return tokens / elapsed


def main() -> None:
    import subprocess

    from value_models import embedded
    from vas_vllm.provenance import cpu_info

    print(cpu_info())
    generator = str(embedded.build_smollm2("bfloat16"))
    for dtype in ("bfloat16", "float32"):   # one process per engine: no state shared between them
        subprocess.run([sys.executable, "-c", f"from benchmarks.dtype_speed import rate; rate({generator!r}, {dtype!r})"],
                       check=True)


if __name__ == "__main__":
    main()
