"""The load client of tests/test_server.py's load test: AsyncOpenAI requests (completions and
chats, streamed or not, and streams dropped mid-way) with a bounded number in flight, latency
summaries, and counters read from vLLM's /metrics."""
from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import openai


def extra_body(xargs: dict[str, Any] | None) -> dict[str, Any]:
    """The request's extra body: ignore_eos (answers run to max_tokens) and the VAS knobs."""
    return {"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}


N_REQUESTS, IN_FLIGHT, MAX_TOKENS, DISCONNECT_AFTER = 200, 16, 24, 3
N_ALONE, ROUNDS = 48, 3  # plain-only and VAS-only batches, alternated (the machine is shared)
DROPPED_MAX_TOKENS = 64  # what a dropped stream asked for (it is read for 3 tokens only)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(round(q * (len(xs) - 1))), len(xs) - 1)]


async def one_request(client, model: str, i: int, xargs: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """kind: 'completion' | 'chat' (streamed or not by i), or 'disconnect' (stream, then close)."""
    vas = xargs is not None
    t0 = time.perf_counter()
    if kind == "disconnect":
        stream = await client.completions.create(
            model=model, prompt=f"Story number {i}:", max_tokens=DROPPED_MAX_TOKENS, temperature=1.0, seed=i,
            stream=True, extra_body=extra_body(xargs))
        n = 0
        async for _ in stream:
            n += 1
            if n >= DISCONNECT_AFTER:
                break
        await stream.close()  # drops the connection mid-stream
        assert n == DISCONNECT_AFTER, f"request {i}: stream ended after {n} chunks"
        return {"i": i, "vas": vas, "kind": kind, "latency": None}
    stream = i % 2 == 0
    common = dict(model=model, max_tokens=MAX_TOKENS, temperature=1.0, seed=i, extra_body=extra_body(xargs))
    if kind == "completion":
        create, kw = client.completions.create, dict(prompt=f"Request {i} says that")
    else:
        create = client.chat.completions.create
        kw = dict(messages=[{"role": "user", "content": f"Tell me {i} things"}])
    if stream:
        finish, usage, text = None, None, []
        async for chunk in await create(stream=True, stream_options={"include_usage": True}, **kw, **common):
            usage = chunk.usage or usage
            for c in chunk.choices:
                text.append(c.text if kind == "completion" else (c.delta.content or ""))
                finish = c.finish_reason or finish
        assert finish == "length" and usage and usage.completion_tokens == MAX_TOKENS, (i, finish, usage)
    else:
        r = await create(**kw, **common)
        (c,) = r.choices
        content = c.text if kind == "completion" else c.message.content
        assert isinstance(content, str) and c.finish_reason == "length", (i, r)
        assert r.usage.completion_tokens == MAX_TOKENS, (i, r.usage)
    return {"i": i, "vas": vas, "kind": kind, "latency": time.perf_counter() - t0}


Job = tuple[int, dict[str, Any] | None, str]  # (seed, vllm_xargs or None, kind)


async def run_jobs(url: str, model: str, jobs: list[Job]) -> tuple[list[dict[str, Any]], float]:
    """Send `jobs` with IN_FLIGHT at a time; (one result per job, seconds for all)."""
    sem = asyncio.Semaphore(IN_FLIGHT)
    # max_retries: a keep-alive connection the server closes as a request goes out is retried
    # (seen once on the loaded machine, outside this test); the server-side accounting in the
    # load test counts every request the server received, retried or not.
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2,
                                  timeout=180) as client:
        async def guarded(job):
            async with sem:
                return await one_request(client, model, *job)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(j) for j in jobs))
        return list(results), time.perf_counter() - t0


def summary(results: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    lat = [r["latency"] for r in results if r["latency"] is not None]
    return {"completed": len(lat), "requests_per_s": round(len(lat) / elapsed, 2),
            "p50_s": round(pct(lat, 0.5), 3), "p95_s": round(pct(lat, 0.95), 3)}


def metric(url: str, name: str, label: str = "") -> int:
    """A counter or gauge from vLLM's /metrics (Prometheus text), summed over matching series."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(rf'^{re.escape(name)}\{{[^}}]*{re.escape(label)}[^}}]*\}} ([0-9.e+]+)$', text, re.M)
    assert found, f"no {name}{{{label}}} in /metrics"
    return int(sum(float(v) for v in found))


def finished_length(url: str) -> int:
    """Requests finished by max_tokens (vLLM does not count aborted ones in this counter)."""
    return metric(url, "vllm:request_success_total", 'finished_reason="length"')


def load_xargs(i: int, vas: bool) -> dict[str, Any] | None:
    return {"vas_beta": 2.0, "vas_top_k": 8, "vas_model": "a" if i % 3 else "b"} if vas else None
