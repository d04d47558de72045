"""Remote VAS's HTTP layer and result file without a server (httpx.MockTransport): retries with
backoff on 429/5xx/connection errors, 4xx passed through with the server's message, responses
without logprobs or token ids refused, the k+1-th entry vLLM adds dropped; the start-up probes'
refusals; the JSONL result file's resume rules."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from vas_vllm.remote import probe
from vas_vllm.remote.api import (CompletionsAPI, RemoteRequestError, RemoteUnavailableError,
                                 RemoteVASError, parse_top_k)
from vas_vllm.remote.results import ResultFileError, ResultStore


def _body(top: dict[int, float], sampled: int, as_ids: bool = True) -> dict:
    key = (lambda t: f"token_id:{t}") if as_ids else (lambda t: f"tok{t}")
    return {"choices": [{"logprobs": {"tokens": [key(sampled)], "token_logprobs": [top.get(sampled, -9.0)],
                                      "top_logprobs": [{key(t): lp for t, lp in top.items()}]}}]}


def _run(handler, coro_fn, **kw):
    async def go():
        async with CompletionsAPI("http://test/v1", "m", transport=httpx.MockTransport(handler),
                                  backoff_s=0.0, **kw) as api:
            return await coro_fn(api), api
    return asyncio.run(go())


def test_parse_top_k_drops_the_sampled_token_vllm_adds():
    body = _body({7: -3.0, 1: -0.5, 2: -1.0, 3: -2.0}, sampled=7)  # 7 is outside the top 3
    (top,) = parse_top_k(body, 3)
    assert (top.ids, top.logprobs, top.sampled) == ([1, 2, 3], [-0.5, -1.0, -2.0], 7)
    (top,) = parse_top_k(_body({2: -1.0, 1: -0.5, 3: -2.0}, sampled=2), 3)
    assert (top.ids, top.sampled) == ([1, 2, 3], 2)


def test_parse_top_k_of_several_prompts_follows_the_choice_index():
    a, b = _body({1: -0.5, 2: -1.0}, 1)["choices"][0], _body({8: -0.1, 9: -3.0}, 9)["choices"][0]
    tops = parse_top_k({"choices": [{**b, "index": 1}, {**a, "index": 0}]}, 2, prompts=2)
    assert [t.ids for t in tops] == [[1, 2], [8, 9]]
    with pytest.raises(RemoteVASError, match=r"sent 3 prompt\(s\), the server returned 2"):
        parse_top_k({"choices": [a, b]}, 2, prompts=3)


def test_parse_top_k_refuses_missing_logprobs_and_token_texts():
    with pytest.raises(RemoteVASError, match="returned no logprobs"):
        parse_top_k({"choices": [{"logprobs": None, "text": "x"}]}, 3)
    with pytest.raises(RemoteVASError, match="return_tokens_as_token_ids"):
        parse_top_k(_body({1: -0.5, 2: -1.0}, 1, as_ids=False), 2)
    with pytest.raises(RemoteVASError, match="asked for the top 3 log-probabilities, the server returned 2"):
        parse_top_k(_body({1: -0.5, 2: -1.0}, 1), 3)


def test_429_and_5xx_are_retried_then_succeed():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "slow down"}})
        if len(calls) == 2:
            return httpx.Response(503, text="upstream down")
        return httpx.Response(200, json=_body({5: -0.1, 6: -2.5}, 5))

    top, api = _run(handler, lambda api: api.top_k([1, 2], 2, 0.7, seed=9))
    assert top.ids == [5, 6] and api.requests == 3 and api.retries == 2
    body = calls[-1]
    assert body["prompt"] == [1, 2] and body["max_tokens"] == 1 and body["logprobs"] == 2
    assert body["temperature"] == 0.7 and body["seed"] == 9 and body["return_tokens_as_token_ids"] is True
    assert (body["top_p"], body["top_k"], body["min_p"], body["repetition_penalty"]) == (1.0, 0, 0.0, 1.0)


def test_unavailable_server_gives_a_clear_error_after_the_retries():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RemoteUnavailableError, match=r"no answer from http://test/v1/completions after 3 "
                       r"attempts \(last: ConnectError: connection refused\).*rerun to resume"):
        _run(refuse, lambda api: api.top_k([1], 2, 1.0, seed=0), max_retries=2)


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_a_request_the_server_ended_is_retried_then_reported(reason):
    """vLLM answers 200 with finish_reason "abort" (a server shutting down drops its requests)
    or "error", and no token: retried like a 503, then reported as unavailable, never parsed as
    a (short) answer. Found when a test's server was stopped gracefully mid-run."""
    calls = []
    ended = {"choices": [{"index": 0, "text": "", "finish_reason": reason,
                          "logprobs": {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}}]}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, json=ended if len(calls) == 1 else _body({5: -0.1, 6: -2.5}, 5))

    top, api = _run(handler, lambda api: api.top_k([1, 2], 2, 0.7, seed=9))
    assert top.ids == [5, 6] and api.requests == 2 and api.retries == 1

    with pytest.raises(RemoteUnavailableError, match=rf"after 3 attempts \(last: HTTP 200 with finish_reason "
                       rf"'{reason}' \(the server ended the request\)\).*rerun to resume"):
        _run(lambda request: httpx.Response(200, json=ended), lambda api: api.top_k([1], 2, 1.0, seed=0),
             max_retries=2)
    # a search block (n continuations) one of which the server ended is not taken as a short block
    block = {"choices": [{"index": 0, "finish_reason": "length", "logprobs": {"tokens": ["token_id:3"]}},
                         {"index": 1, "finish_reason": reason, "logprobs": {"tokens": []}}]}
    with pytest.raises(RemoteUnavailableError, match=f"finish_reason '{reason}'"):
        _run(lambda request: httpx.Response(200, json=block),
             lambda api: api.call("POST", "/v1/completions", {"n": 2}, what="search extend request"),
             max_retries=0)


def test_a_400_passes_through_with_the_server_message_and_no_retry():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "This model's maximum context length is 8"}})

    with pytest.raises(RemoteRequestError, match="HTTP 400: This model's maximum context length is 8") as e:
        _run(handler, lambda api: api.draw([1], 1.0, seed=0, exclude=[3, 4]))
    assert e.value.status == 400 and len(calls) == 1


def test_draw_sends_the_bias_on_the_excluded_ids():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, json=_body({9: -4.0}, 9))

    token, _ = _run(handler, lambda api: api.draw([1], 1.3, seed=4, exclude=[3, 4]))
    assert token == 9 and seen["logit_bias"] == {"3": -100.0, "4": -100.0} and seen["logprobs"] == 0


def test_probes_refuse_a_low_logprobs_limit_and_logits():
    def limit(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "Requested sample logprobs of 25, which is "
                                                   "greater than max allowed: 20"}})

    with pytest.raises(probe.IncompatibleServerError, match=r"vas_top_k=25 needs the top 25 .*limit is 20.*"
                       r"--max-logprobs 25"):
        _run(limit, lambda api: probe.check_logprobs(api, [1], 25, "vas_top_k=25"))

    def logits(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_body({1: 12.5, 2: 11.0}, 1))

    with pytest.raises(probe.IncompatibleServerError, match="it returns logits"):
        _run(logits, lambda api: probe.check_logprobs(api, [1], 2, "vas_top_k=2"))


def test_logprobs_kind_tells_raw_from_processed():
    raw = {1: -0.5, 2: -1.5, 3: -2.0}

    def server(processed: bool):
        def handler(request: httpx.Request) -> httpx.Response:
            t = json.loads(request.content)["temperature"]
            lps = {k: v / t for k, v in raw.items()} if processed else raw  # ratios scale by 1/T
            return httpx.Response(200, json=_body(lps, 1))
        return handler

    assert _run(server(False), lambda api: probe.logprobs_kind(api, [1], 3, 0.5))[0] == "raw"
    assert _run(server(True), lambda api: probe.logprobs_kind(api, [1], 3, 0.5))[0] == "processed"


# ---- the result file ---------------------------------------------------------------------------
SETTINGS = {"model": "m", "knobs": {"vas_beta": 2.0, "vas_model": ["a", "b"]}, "max_tokens": 4}


def test_result_file_resumes_and_refuses_other_runs(tmp_path):
    path = tmp_path / "out.jsonl"
    prompts = ["a", "b", [1, 2]]
    store = ResultStore(path, SETTINGS)
    assert store.load(prompts) == {}
    store.start()
    store.write({"index": 2, "prompt": [1, 2], "text": "x", "token_ids": [5], "finish_reason": "length",
                 "requests": 1})
    with open(path, "a") as f:
        f.write('{"index": 0, "prompt": "a", "te')  # a crash mid-write
    again = ResultStore(path, json.loads(json.dumps(SETTINGS)))
    assert set(again.load(prompts)) == {2}
    assert path.read_text().endswith("}\n")  # the torn line is gone
    with pytest.raises(ResultFileError, match=r"other settings \(max_tokens: 4 there, 8 now\)"):
        ResultStore(path, {**SETTINGS, "max_tokens": 8}).load(prompts)
    with pytest.raises(ResultFileError, match=r"prompt 2 there is \[1, 2\], now \[1, 3\]"):
        ResultStore(path, SETTINGS).load(["a", "b", [1, 3]])
    other = tmp_path / "other.jsonl"
    other.write_text('{"something": 1}\n')
    with pytest.raises(ResultFileError, match="not a remote VAS result file"):
        ResultStore(other, SETTINGS).load(prompts)
