"""Start-up checks of a remote server, each refusing a mismatch with an error that names it:
the model is served, its vocabulary size and tokenizer match the value models', it returns
top-k log-probabilities with token ids for the k asked, and what those log-probabilities are
(pi_1 before temperature, vLLM's default `raw_logprobs`; or pi_T, `processed_logprobs`).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from vas_vllm.remote.api import CompletionsAPI, RemoteRequestError, RemoteVASError, TopK

logger = logging.getLogger("vas_vllm.remote")
VOCAB_RE = re.compile(r"[Vv]ocabulary size:? (\d+)")
LIMIT_RE = re.compile(r"max(?:imum)? allowed:? (\d+)")
PROBE_TEXT = "Hello, world! 1234 5678\n\tTabs  and   spaces. Ünïcödé: é, ß, 中文, 日本語, 🙂 🚀."
LogprobsKind = Literal["raw", "processed"]


class IncompatibleServerError(RemoteVASError):
    """The server or its model cannot serve remote VAS with these value models and knobs."""


@dataclass
class ServerFacts:
    vocab_size: int | None         # from the server's logit_bias validation; None if it does not check
    max_model_len: int | None      # from /v1/models (vLLM), None if not reported
    has_tokenize: bool             # vLLM's /tokenize route


async def served_model(api: CompletionsAPI) -> int | None:
    """Refuse a model the server does not list; its max_model_len when the server reports it."""
    models = await api.models()
    if models is None:
        return None
    ids = [m.get("id") for m in models]
    if api.model not in ids:
        raise IncompatibleServerError(f"model {api.model!r} is not served at {api.base_url}; it "
                                      f"serves {ids}")
    entry = models[ids.index(api.model)]
    return int(entry["max_model_len"]) if entry.get("max_model_len") else None


async def vocab_size(api: CompletionsAPI, expected: int) -> int | None:
    """The served model's vocabulary size (logits width), read from the server's refusal of a
    logit_bias on token id `expected`: vLLM answers 400 "... Vocabulary size: N"."""
    try:
        await api.completion([0], what="vocabulary probe", temperature=0.0, logit_bias={str(expected): 0.0})
    except RemoteRequestError as e:
        m = VOCAB_RE.search(e.server_message)
        if m:
            return int(m.group(1))
        try:  # another server's wording: ids below `expected` must be accepted
            await api.completion([0], what="vocabulary probe", temperature=0.0,
                                 logit_bias={str(expected - 1): 0.0})
        except RemoteRequestError:
            return None
        return expected
    raise IncompatibleServerError(
        f"the model at {api.base_url} accepts token id {expected} in logit_bias, so its "
        f"vocabulary is larger than the value models' ({expected})")


async def check_tokenizer(api: CompletionsAPI, tokenizer: Any, what: str) -> bool:
    """Compare the server's tokenization of a probe text with the value models' tokenizer
    (vLLM's /tokenize, else echoing the prompt's token ids back). True when /tokenize exists."""
    ids = list(range(0, len(tokenizer), max(1, len(tokenizer) // 11)))[1:] + [len(tokenizer) - 1]
    text = PROBE_TEXT + " " + tokenizer.decode(ids) + " " + " ".join(
        t for t in (tokenizer.bos_token, tokenizer.eos_token) if t)
    server = await api.tokenize(text, add_special_tokens=False)
    local = tokenizer(text, add_special_tokens=False)["input_ids"]
    has_tokenize = server is not None
    if server is None:  # no /tokenize: the prompt's ids echoed back (with special tokens)
        try:
            body = await api.completion(text, what="tokenizer probe (echo)", temperature=0.0, echo=True,
                                        logprobs=0, return_tokens_as_token_ids=True)
            tokens = body["choices"][0]["logprobs"]["tokens"]
            server = [int(t.split(":", 1)[1]) for t in tokens[:-1]]
        except (RemoteRequestError, KeyError, IndexError, TypeError, ValueError) as e:
            raise IncompatibleServerError(
                f"cannot check the tokenizer of {api.model!r} at {api.base_url}: it has no /tokenize "
                f"route and does not echo prompt token ids ({e}); pass check_tokenizer=False if "
                "you know it is the value models' tokenizer") from None
        local = tokenizer(text)["input_ids"]
    if server != local:
        first = next((i for i, (a, b) in enumerate(zip(server, local)) if a != b), min(len(server), len(local)))
        raise IncompatibleServerError(
            f"tokenizer mismatch: {api.model!r} at {api.base_url} tokenizes a probe text into "
            f"{len(server)} tokens, {what} into {len(local)}; they first differ at token {first} "
            f"(server {server[first:first + 5]}, local {local[first:first + 5]}). VAS scores the "
            "generator's token ids with the value model, so both must share one tokenizer")
    return has_tokenize


async def check_logprobs(api: CompletionsAPI, probe: list[int], n: int, knob: str) -> TopK:
    """One top-n request as the steps will make it: refuse a server without logprobs, without
    token ids, or with a limit below n."""
    try:
        top = await api.top_k(probe, n, 1.0, seed=0, what="logprobs probe")
    except RemoteRequestError as e:
        if "logprob" not in e.server_message.lower():
            raise
        m = LIMIT_RE.search(e.server_message)
        limit = f" (its limit is {m.group(1)})" if m else ""
        raise IncompatibleServerError(
            f"{knob} needs the top {n} log-probabilities per step, more than the server at "
            f"{api.base_url} returns{limit}: start vLLM with --max-logprobs {n} or more, or lower "
            f"vas_top_k. The server said: {e.server_message}") from None
    lse = math.log(sum(math.exp(lp) for lp in top.logprobs))
    if lse > 1e-3:
        raise IncompatibleServerError(
            f"the server's top-{n} 'log-probabilities' sum to exp({lse:.3f}) > 1: it returns logits "
            "(vLLM --logprobs-mode raw_logits or processed_logits); remote VAS needs raw_logprobs "
            "(vLLM's default) or processed_logprobs")
    return top


async def logprobs_kind(api: CompletionsAPI, probe: list[int], n: int, temperature: float) -> LogprobsKind:
    """Whether the server's log-probabilities are taken before temperature (the same at T = 1
    and at `temperature`: vLLM's raw_logprobs) or after it (log_softmax(l / T): processed_logprobs)."""
    one = await api.top_k(probe, n, 1.0, seed=0, what="logprobs-mode probe")
    at_t = await api.top_k(probe, n, temperature, seed=0, what="logprobs-mode probe")
    a = dict(zip(one.ids, one.logprobs))
    b = dict(zip(at_t.ids, at_t.logprobs))
    common = [t for t in one.ids if t in b]
    if len(common) >= 2:
        if all(abs(a[t] - b[t]) < 1e-4 for t in common):
            return "raw"
        ref = common[0]
        if all(abs((b[t] - b[ref]) - (a[t] - a[ref]) / temperature) < 1e-3 * max(1.0, abs(a[t] - a[ref]) / temperature)
               for t in common):
            return "processed"
    raise IncompatibleServerError(
        f"cannot tell what the server's log-probabilities are: at temperature 1 and {temperature} "
        f"they are neither equal (before temperature) nor scaled by 1/T (after it): {one.logprobs[:4]} "
        f"vs {at_t.logprobs[:4]}")
