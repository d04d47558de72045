"""The HTTP side of remote VAS: the few OpenAI-compatible completions calls it needs, with
retries, timeouts and errors that name their cause.

Two kinds of completions request per decoding step (both `max_tokens=1`, token ids as the prompt):
- `top_k` / `top_k_many`: `logprobs=n` with `return_tokens_as_token_ids` (a vLLM extension: the
  top-n come back keyed "token_id:ID", so no two tokens that decode to the same text can be
  confused), for one prompt or for a list of prompts in one request. The server also samples one
  token per prompt at the request's temperature; it comes back as `sampled`.
- `draw`: one token sampled by the server at the step's temperature, optionally with
  `logit_bias` -100 on some ids (the top-k, to draw from the rest of the vocabulary).
Every request states the neutral sampling settings explicitly (top_p 1, top_k 0, min_p 0, no
penalties), so a server's generation-config defaults cannot change the distribution drawn from.

Retries: HTTP 429 and 5xx, timeouts and connection errors are retried with exponential backoff
(`Retry-After` honoured); other 4xx are raised at once as `RemoteRequestError` with the
server's own message. Retries are safe: every draw carries its own seed.
"""
from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

logger = logging.getLogger("vas_vllm.remote")

TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")
MAX_BIAS = 100.0          # OpenAI and vLLM clamp logit_bias to [-100, 100]
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Neutral sampling settings sent with every request (vLLM extensions: top_k, min_p,
# repetition_penalty), so that generation-config defaults of the served model do not apply.
NEUTRAL = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
           "frequency_penalty": 0.0, "presence_penalty": 0.0}


class RemoteVASError(RuntimeError):
    """Remote VAS cannot go on (the message says why)."""


class RemoteRequestError(RemoteVASError):
    """The server refused a request (HTTP 4xx other than 429); `status` and the server's
    `server_message` are kept."""

    def __init__(self, message: str, status: int, server_message: str) -> None:
        super().__init__(message)
        self.status, self.server_message = status, server_message


class RemoteUnavailableError(RemoteVASError):
    """The server did not answer (connection refused, timeouts, 429/5xx) after every retry."""


@dataclass(frozen=True)
class TopK:
    """The top-n of one next-token distribution, best first, and the server's own sample."""

    ids: list[int]
    logprobs: list[float]
    sampled: int


def server_message(response: httpx.Response) -> str:
    """The error text of an OpenAI-style ({"error": {"message"}}), FastAPI ({"detail"}) or
    plain-text error response."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            for key in ("message", "detail"):
                if err.get(key):
                    return str(err[key])
        elif isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:2000]


def _token_id(key: str, what: str) -> int:
    m = TOKEN_ID.match(key)
    if m is None:
        raise RemoteVASError(
            f"the server returned {what} {key!r} where a 'token_id:ID' string was expected: it "
            "ignores return_tokens_as_token_ids (a vLLM extension). Remote VAS needs token ids, "
            "not token texts (several ids can decode to the same text)")
    return int(m.group(1))


def parse_top_k(body: dict[str, Any], n: int, prompts: int = 1) -> list[TopK]:
    """The top-n of each prompt of a completions response made with `logprobs=n` and token ids
    as strings (one choice per prompt, in prompt order by `index`).

    vLLM lists the sampled token first and adds it to the top-n when it is not among them
    (n + 1 entries); that extra entry is dropped here."""
    try:
        choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
    except (KeyError, TypeError, AttributeError):
        raise RemoteVASError(f"unexpected completions response (no choices): {str(body)[:500]}") from None
    if len(choices) != prompts:
        raise RemoteVASError(f"sent {prompts} prompt(s), the server returned {len(choices)} choice(s)")
    return [_parse_choice(c, n) for c in choices]


def _parse_choice(choice: dict[str, Any], n: int) -> TopK:
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    if not logprobs or not logprobs.get("top_logprobs") or logprobs["top_logprobs"][0] is None:
        raise RemoteVASError(
            "the endpoint returned no logprobs for the generated token (choices[].logprobs is "
            f"{str(logprobs)[:200]}): remote VAS needs the top-k log-probabilities of every step")
    sampled = _token_id(logprobs["tokens"][0], "the token")
    entries = [(_token_id(key, "the top_logprobs key"), float(lp))
               for key, lp in logprobs["top_logprobs"][0].items()]
    if len(entries) == n + 1:
        entries = [e for e in entries if e[0] != sampled]
    entries.sort(key=lambda e: -e[1])
    if len(entries) < n:
        raise RemoteVASError(f"asked for the top {n} log-probabilities, the server returned {len(entries)}")
    entries = entries[:n]
    return TopK([e[0] for e in entries], [e[1] for e in entries], sampled)


class CompletionsAPI:
    """One OpenAI-compatible server and model. Use as `async with CompletionsAPI(...) as api`."""

    def __init__(
        self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
        max_retries: int = 5, backoff_s: float = 0.5, max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport`: an httpx transport to use instead of the network (tests, proxies)."""
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.max_retries, self.backoff_s = max_retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client_args = dict(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s), transport=transport,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))
        self._client: httpx.AsyncClient | None = None
        self.requests = 0        # HTTP requests sent (retries included)
        self.retries = 0
        self._jitter = random.Random()  # backoff jitter only; never used for sampling

    async def __aenter__(self) -> CompletionsAPI:
        self._client = httpx.AsyncClient(**self._client_args)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- transport -----------------------------------------------------------------------
    async def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                   what: str, missing_ok: bool = False) -> dict[str, Any] | None:
        """JSON of a successful response. None for 404/405 when `missing_ok` (a route this
        server does not have). Raises RemoteRequestError or RemoteUnavailableError."""
        if self._client is None:
            raise RuntimeError("CompletionsAPI is used outside `async with`")
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            self.requests += 1
            wait = None
            try:
                response = await self._client.request(method, path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if response.status_code < 400:
                    try:
                        answer = response.json()
                    except ValueError:
                        raise RemoteVASError(f"{what}: {self.base_url}{path} answered with non-JSON "
                                             f"{response.text[:200]!r}") from None
                    cut = _ended_by_server(answer)
                    if cut is None:
                        return answer
                    # vLLM answers 200 with finish_reason "abort" for the requests it drops
                    # while shutting down (SIGTERM, a rolling restart) and "error" for one the
                    # engine failed: no usable tokens, so it is retried like a 503
                    last = f"HTTP {response.status_code} with finish_reason {cut!r} (the server ended the request)"
                else:
                    message = server_message(response)
                    if missing_ok and response.status_code in (404, 405):
                        return None
                    if response.status_code not in RETRY_STATUS:
                        raise RemoteRequestError(
                            f"{what}: the server at {self.base_url} refused the request with HTTP "
                            f"{response.status_code}: {message}", response.status_code, message)
                    last = f"HTTP {response.status_code}: {message}"
                    wait = _retry_after(response)
            if attempt == self.max_retries:
                break
            delay = wait if wait is not None else self.backoff_s * 2 ** attempt
            delay *= 1.0 + 0.25 * self._jitter.random()
            logger.warning("%s: %s; retry %d/%d in %.1f s", what, last, attempt + 1,
                           self.max_retries, delay)
            await asyncio.sleep(delay)
        raise RemoteUnavailableError(
            f"{what}: no answer from {self.base_url}{path} after {self.max_retries + 1} attempts "
            f"(last: {last}). Is the server up? Finished texts are kept; rerun to resume")

    async def completion(self, prompt: Sequence[int] | Sequence[Sequence[int]] | str, *, what: str,
                         **fields: Any) -> dict[str, Any]:
        """POST /v1/completions of one new token; `prompt`: text, token ids, or a list of
        token-id lists (one choice each)."""
        if not isinstance(prompt, str):
            prompt = [list(p) for p in prompt] if prompt and not isinstance(prompt[0], int) else list(prompt)
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, **NEUTRAL, **fields}
        out = await self.call("POST", "/v1/completions", body, what=what)
        assert out is not None
        return out

    # ---- the two step requests -------------------------------------------------------------
    async def top_k(self, prompt: Sequence[int], n: int, temperature: float, seed: int,
                    what: str = "top-k request") -> TopK:
        body = await self.completion(prompt, what=what, temperature=temperature, seed=seed,
                                     logprobs=n, return_tokens_as_token_ids=True)
        return parse_top_k(body, n)[0]

    async def top_k_many(self, prompts: Sequence[Sequence[int]], n: int, temperature: float,
                         what: str = "top-k request") -> list[TopK]:
        """The top-n of several prompts in one request (the completions API takes a list of
        prompts). Unseeded: the server's own samples are not used then."""
        body = await self.completion(prompts, what=what, temperature=temperature, logprobs=n,
                                     return_tokens_as_token_ids=True)
        return parse_top_k(body, n, len(prompts))

    async def draw(self, prompt: Sequence[int], temperature: float, seed: int,
                   exclude: Sequence[int] = (), what: str = "draw request") -> int:
        """One token sampled by the server; `exclude` ids get logit_bias -100."""
        bias = {str(t): -MAX_BIAS for t in exclude} or None
        body = await self.completion(prompt, what=what, temperature=temperature, seed=seed,
                                     logprobs=0, return_tokens_as_token_ids=True, logit_bias=bias)
        try:
            token = body["choices"][0]["logprobs"]["tokens"][0]
        except (KeyError, IndexError, TypeError):
            raise RemoteVASError(f"{what}: no token in the response: {str(body)[:300]}") from None
        return _token_id(token, "the token")

    # ---- other routes ------------------------------------------------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int] | None:
        """The server's tokenization of `text` (vLLM's /tokenize), or None without that route."""
        out = await self.call("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                    "add_special_tokens": add_special_tokens},
                              what="tokenize", missing_ok=True)
        return None if out is None else [int(t) for t in out["tokens"]]

    async def models(self) -> list[dict[str, Any]] | None:
        out = await self.call("GET", "/v1/models", what="list models", missing_ok=True)
        return None if out is None else list(out.get("data", []))


def _ended_by_server(answer: Any) -> str | None:
    """The finish_reason of a choice the server ended without finishing it ("abort": dropped,
    e.g. while shutting down; "error": failed in the engine), else None."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if reason in ("abort", "error"):
            return reason
    return None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["retry-after"]), 60.0)
    except (KeyError, ValueError):
        return None
