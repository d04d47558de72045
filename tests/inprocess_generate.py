"""Run by tests/test_processor_v1.py in a subprocess: VAS requests through an engine in the
layout the demo and benchmarks use (vas_vllm/local_engine.py: the engine in this process, on
every core). A subprocess, because that layout binds the calling process's OpenMP threads.

    python tests/inprocess_generate.py SPEC.json OUT.json
SPEC: {"generator", "value_models", "engine", "requests": [{"prompt", "params"}]}.
OUT: {"backend", "multiprocessing", "outputs": [{"token_ids", "logprobs"}]}.
"""
from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    from vas_vllm.local_engine import in_process_engine_kwargs

    layout = in_process_engine_kwargs()
    from vllm import LLM, SamplingParams

    from vas_vllm import vas_engine_kwargs

    spec = json.loads(open(spec_path).read())
    llm = LLM(model=spec["generator"], **spec["engine"], **layout,
              **vas_engine_kwargs(value_models=spec["value_models"], max_top_k=32))
    reqs = spec["requests"]
    outs = llm.generate([r["prompt"] for r in reqs],
                        [SamplingParams(**r["params"]) for r in reqs], use_tqdm=False)
    result = {
        "backend": llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend,
        "multiprocessing": os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"],
        "outputs": [{"token_ids": list(o.outputs[0].token_ids),
                     "logprobs": [d[t].logprob for t, d in zip(o.outputs[0].token_ids,
                                                             o.outputs[0].logprobs or [])]}
                    for o in outs],
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(*sys.argv[1:3])
