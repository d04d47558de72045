"""Searched answers over the OpenAI API: a thin front server in front of a vLLM (or any
OpenAI-compatible) server.

    vas-vllm search-server --upstream http://127.0.0.1:8000 --model smollm2 \\
        --value-model positive=PATH --reward vader_positive --port 8001

    client = openai.OpenAI(base_url="http://127.0.0.1:8001/v1", api_key="-")
    client.completions.create(model="smollm2", prompt="My day was", max_tokens=40,
                              extra_body={"vllm_xargs": {"search_k": 8, "search_blocks": 2}})

A /v1/completions or /v1/chat/completions request whose `vllm_xargs` hold `search_*` knobs
(vas_vllm/search/knobs.py) is answered by a search (one per prompt and per `n`), run against the
upstream server with token-id prompts (search/remote.py); chat messages are rendered by the
upstream's own chat template (its /tokenize). Everything else (other routes, requests without
search knobs, streams) is passed to the upstream unchanged. Why a front server and not a vLLM
middleware: the search makes many generate calls per request, and from outside the engine it
can use any upstream, the plugin's included, and be scaled or restarted on its own.

Errors: a bad knob, a field the search cannot honour (stream, logprobs, echo, stop strings,
top_p / top_k / min_p / penalties other than neutral, best_of), a search that needs a reward the
server was not started with: HTTP 400 naming it, in vLLM's error format. Upstream errors keep
their status. Each search is logged the way vLLM logs requests.
"""
from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vas_vllm.remote.api import CompletionsAPI, RemoteRequestError, RemoteUnavailableError, RemoteVASError
from vas_vllm.search.knobs import SearchKnobError, wants_search

logger = logging.getLogger("vas_vllm.search.server")

# Request fields a search honours; any other field with a non-default value is refused (400).
SEARCH_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
                 "seed", "n", "stream", "vllm_xargs", "user", "stop_token_ids", "add_generation_prompt",
                 "chat_template_kwargs"}
NEUTRAL_DEFAULTS = {"top_p": 1.0, "top_k": (0, -1), "min_p": 0.0, "frequency_penalty": 0.0,
                    "presence_penalty": 0.0, "repetition_penalty": 1.0, "logprobs": (None, False),
                    "top_logprobs": (None, 0), "echo": False, "best_of": (None, 1), "stop": (None, [], ""),
                    "logit_bias": (None, {}), "suffix": None, "stream_options": None,
                    "ignore_eos": False, "min_tokens": 0}


class SearchRequestError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def configure_logging() -> None:
    """vLLM's log format: "INFO 12-04 17:42:48 [server.py:123] message"."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    root = logging.getLogger("vas_vllm")
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # not twice through the CLI's basicConfig handler


def check_fields(body: Mapping[str, Any]) -> None:
    """Refuse what a search cannot honour, naming the field."""
    if body.get("stream"):
        raise SearchRequestError("stream is not supported with search_* knobs: the answer is known "
                                 "only when the search ends", "stream")
    for key, value in body.items():
        if key in SEARCH_FIELDS:
            continue
        allowed = NEUTRAL_DEFAULTS.get(key, ...)
        ok = (allowed is not ... and (value == allowed or (isinstance(allowed, tuple) and value in allowed)))
        if not ok:
            raise SearchRequestError(f"{key}={value!r} is not supported with search_* knobs (the search "
                                     "samples pi_ref with neutral settings)", key)
    xargs = body.get("vllm_xargs") or {}
    vas = [k for k in xargs if isinstance(k, str) and k.startswith("vas_")]
    if vas:
        raise SearchRequestError(f"{vas}: vas_* knobs cannot be combined with search_* knobs", vas[0])


def _int_field(body: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SearchRequestError(f"{key} must be an integer in [{lo}, {hi}], found {v!r}", key)
    return v


def create_app(searcher: Any, upstream: str, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: `searcher` is an AsyncRemoteSearcher against `upstream`."""
    app = FastAPI(title="vas-vllm search front server")
    proxy = httpx.AsyncClient(base_url=upstream.rstrip("/").removesuffix("/v1"), timeout=None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        kind = "BadRequestError" if status == 400 else "UpstreamError"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                            status_code=status)

    async def forward(request: Request, body: bytes | None = None) -> Response:
        url = httpx.URL(path=request.url.path, query=request.url.query.encode())
        fwd = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        req = proxy.build_request(request.method, url, headers=fwd,
                                  content=body if body is not None else await request.body())
        try:
            resp = await proxy.send(req, stream=True)
        except httpx.HTTPError as e:
            logger.error("upstream %s unreachable for %s %s: %s", upstream, request.method, request.url.path, e)
            return error(502, f"the upstream server {upstream} did not answer: {type(e).__name__}: {e}")
        keep = {k: v for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")}
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=keep,
                                 background=_Closer(resp))

    async def prompts_of(body: Mapping[str, Any], chat: bool) -> list[list[int]]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise SearchRequestError("messages must be a non-empty list", "messages")
            tok_body = {"model": body.get("model"), "messages": msgs,
                        "add_generation_prompt": body.get("add_generation_prompt", True)}
            if body.get("chat_template_kwargs"):
                tok_body["chat_template_kwargs"] = body["chat_template_kwargs"]
            r = await proxy.post("/tokenize", json=tok_body, headers=headers)
            if r.status_code != 200:
                raise RemoteRequestError(f"the upstream could not render the chat: {r.text[:300]}",
                                         r.status_code, r.text)
            return [list(r.json()["tokens"])]
        p = body.get("prompt")
        if isinstance(p, str):
            return [searcher.tokenizer(p)["input_ids"]]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return [list(p)]
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            return [searcher.tokenizer(x)["input_ids"] for x in p]
        if isinstance(p, list) and p and all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in p):
            return [list(x) for x in p]
        raise SearchRequestError("prompt must be a string, a list of strings, a list of token ids or a "
                                 "list of such lists", "prompt")

    async def searched(request: Request, chat: bool) -> Response:
        raw = await request.body()
        try:
            import json

            body = json.loads(raw)
        except ValueError:
            return await forward(request, raw)
        if not isinstance(body, dict) or not wants_search(body.get("vllm_xargs")):
            return await forward(request, raw)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-search-{uuid.uuid4().hex[:16]}"
        t0 = time.perf_counter()
        try:
            check_fields(body)
            n = _int_field(body, "n", 1, 1, 64)
            key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
            max_tokens = _int_field(body, key, 16, 1, 1 << 20)
            temperature = body.get("temperature", 1.0)
            temperature = 1.0 if temperature is None else temperature
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 100:
                raise SearchRequestError(f"temperature must be a number in (0, 100] for a search (it "
                                         f"samples), found {temperature!r}", "temperature")
            seed = body.get("seed")
            if seed is None:
                seed = random.randrange(1 << 31)
            elif isinstance(seed, bool) or not isinstance(seed, int):
                raise SearchRequestError(f"seed must be an integer, found {seed!r}", "seed")
            stop_ids = body.get("stop_token_ids") or None
            knobs = dict(body["vllm_xargs"])
            searcher.engine.parse(knobs, max_tokens)        # 400 before any upstream request
            prompts = await prompts_of(body, chat)
            logger.info("Received search request %s: %d prompt(s) x n=%d, max_tokens=%d, knobs %s",
                        rid, len(prompts), n, max_tokens, knobs)
            flat = [p for p in prompts for _ in range(n)]
            outs, stats = await searcher.search(flat, max_tokens, float(temperature), seed=seed,
                                                stop_token_ids=stop_ids, **knobs)
        except (SearchRequestError, SearchKnobError) as e:
            logger.info("search request %s refused: %s", rid, e)
            return error(400, str(e), getattr(e, "param", None) or _knob_of(str(e)))
        except RemoteRequestError as e:
            logger.warning("search request %s: upstream refused: %s", rid, e)
            return error(e.status, e.server_message)
        except (RemoteUnavailableError, RemoteVASError) as e:
            logger.error("search request %s failed: %s", rid, e)
            return error(502, str(e))
        logger.info("Finished search request %s in %.2f s: %d answers, %d generated tokens (%d "
                    "discarded), mean KL bound %.2f nats", rid, time.perf_counter() - t0, len(outs),
                    stats.gen_tokens, stats.gen_tokens - sum(len(o.token_ids) for o in outs), stats.kl_bound)
        choices = []
        for i, o in enumerate(outs):
            info = {"score": o.score, "reward": o.reward, "kl_bound": o.kl_bound, "decisions": o.decisions,
                    "generated_tokens": o.gen_tokens}
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                                "logprobs": None, "finish_reason": o.finish_reason, "search": info})
            else:
                choices.append({"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason,
                                "search": info})
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(len(o.token_ids) for o in outs)
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "search": stats.as_dict()})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await searched(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await searched(request, chat=True)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def passthrough(request: Request, path: str) -> Response:
        return await forward(request)

    @app.on_event("shutdown")
    async def _close() -> None:
        await proxy.aclose()

    return app


class _Closer:
    """Background task closing an upstream response once it was streamed."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp

    async def __call__(self) -> None:
        await self.resp.aclose()


def _knob_of(message: str) -> str | None:
    for word in message.replace("'", " ").replace(",", " ").split():
        if word.startswith("search_"):
            return word
    return None


__all__ = ["CompletionsAPI", "SearchRequestError", "check_fields", "configure_logging", "create_app"]
