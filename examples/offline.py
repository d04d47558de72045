"""Offline VAS with vLLM's LLM class: plain sampling next to VAS at two strengths.

    .venv/bin/python examples/offline.py [--value-model PATH] [--generator PATH]

Defaults to the embedded SmolLM2-135M-Instruct generator and, when it has been built
(`make demo` builds it), the embedded "positive" value model; pass --value-model for another.
"""
from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default=None, help="generator folder or hub id (default: embedded SmolLM2)")
    p.add_argument("--value-model", default=None, help="value-model folder or hub id (default: embedded 'positive')")
    args = p.parse_args()

    from vllm import LLM, SamplingParams

    from value_models import embedded
    from vas_vllm import vas_engine_kwargs

    generator = args.generator or str(embedded.build_smollm2("bfloat16"))
    value_model = args.value_model or str(embedded.build_positive())
    llm = LLM(model=generator, max_model_len=512, kv_cache_memory_bytes=1 << 30,
              **vas_engine_kwargs(value_models={"positive": value_model}, default_top_k=20))
    prompts = ["The movie was", "My neighbour's new dog"]
    settings = {
        "plain": SamplingParams(temperature=1.0, max_tokens=40, seed=0),
        "vas beta=2": SamplingParams(temperature=1.0, max_tokens=40, seed=0,
                                     extra_args={"vas_beta": 2.0}),
        "vas beta=8": SamplingParams(temperature=1.0, max_tokens=40, seed=0,
                                     extra_args={"vas_beta": 8.0, "vas_model": "positive",
                                                 "vas_top_k": 20}),
    }
    for name, params in settings.items():
        for out in llm.generate(prompts, params, use_tqdm=False):
            print(f"[{name}] {out.prompt}{out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
