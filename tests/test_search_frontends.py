"""The search's three front-ends on the embedded models (SmolLM2-135M-Instruct and "positive",
VADER reward): offline over a vllm.LLM, remote over `vllm serve`, and the serving front
(`vas-vllm search-server`) driven by the official `openai` client. Plus the errors each gives.

One `vllm serve` of SmolLM2 (no plugin) backs the remote searcher and two front servers: one with
the reward, one without (a search that needs the reward must get a 400 there).
"""
from __future__ import annotations

import gc
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from server_process import free_ports, launch, server_env  # noqa: E402

from vas_vllm.local_engine import engine_dtype  # noqa: E402
from vas_vllm.search.knobs import SearchKnobError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "smollm2"
PROMPTS = ["The movie was", "My day at the beach"]
KNOBS = {"search_k": 3, "search_blocks": 2}
MAX_TOKENS = 12
# the demo's dtype rule (float32 where bf16 is not native: 6x faster there)
DTYPE = engine_dtype()
SERVER_ARGS = ["--served-model-name", NAME, "--dtype", DTYPE, "--enforce-eager", "--max-model-len", "256",
               "--max-num-seqs", "16", "--max-num-batched-tokens", str(16 * 256), "--block-size", "32", "--enable-prefix-caching",
               "--kv-cache-memory-bytes", str(1 << 27), "--seed", "0", "--disable-uvicorn-access-log",
               "--disable-log-stats", "--enable-prompt-tokens-details"]


@pytest.fixture(scope="module")
def positive() -> Path:
    from value_models.embedded import build_positive

    return build_positive()


@pytest.fixture(scope="module")
def upstream(smollm2_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("search-logs")
    (port,) = free_ports(1)
    # one process (uni executor, engine core in the API server): two vLLM imports fewer to start
    server = launch("smollm2", smollm2_dir, [*SERVER_ARGS, "--distributed-executor-backend", "uni"],
                    logs / "vllm.log", port, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    try:
        print(f"upstream healthy after {server.wait_healthy():.0f} s")
        yield server
    finally:
        server.stop()


class FrontServer:
    """`python -m vas_vllm.cli search-server ...` in its own process, log in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        (self.port,) = free_ports(1)
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vas_vllm.cli", "search-server", "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, env=server_env(), cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"search-server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(log.read_text()[-3000:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def fronts(upstream, smollm2_dir, positive, tmp_path_factory):
    logs = tmp_path_factory.mktemp("front-logs")
    common = ["--upstream", upstream.url, "--model", NAME, "--tokenizer", str(smollm2_dir),
              "--value-model", f"positive={positive}", "--max-slots", "32", "--max-len", "256", "--threads", "1"]
    with_reward = FrontServer([*common, "--reward", "vader_positive"], logs / "front.log")
    no_reward = None
    try:
        no_reward = FrontServer(common, logs / "front-noreward.log")
        yield {"reward": with_reward, "none": no_reward}
    finally:
        with_reward.stop()
        if no_reward is not None:
            no_reward.stop()


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    from vllm import LLM

    engine = LLM(model=str(smollm2_dir), dtype=DTYPE, seed=0, enforce_eager=True, max_model_len=256,
                 max_num_seqs=16, block_size=32, enable_prefix_caching=True, kv_cache_memory_bytes=1 << 27,
                 max_num_batched_tokens=16 * 256, disable_log_stats=False)   # its counters check ours
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


def _value_reference(positive: Path):
    """V of a text in reward units by a float64 forward, with the float32 error bound of that
    computation (fp_bounds; RUNTIME_SLACK for the runtime's attention)."""
    from value_models.metadata import VASMetadata
    from value_reference import RUNTIME_SLACK, Float64ValueModel

    ref = Float64ValueModel(positive)
    norm = VASMetadata.load(positive).reward_normalization

    def value(ids: list[int]) -> tuple[float, float]:
        _, _, v, bound = ref.bounded(ids, [], -1)
        return float(v[0]) * norm["std"] + norm["mean"], RUNTIME_SLACK * float(bound[0]) * norm["std"]
    return value


def test_offline_search_is_deterministic_exact_and_accounted(llm, positive):
    from value_models.training.rewards import parse_reward
    from vas_vllm.search import Searcher

    searcher = Searcher(llm, value_models={"positive": str(positive)}, reward="vader_positive",
                        max_slots=16, max_len=256)
    llm.reset_prefix_cache()  # the same engine state for both runs (see Searcher.generate)
    a = searcher.generate(PROMPTS, MAX_TOKENS, seed=3, **KNOBS)
    stats = searcher.last_stats
    llm.reset_prefix_cache()
    b = searcher.generate(PROMPTS, MAX_TOKENS, seed=3, **KNOBS)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    reward = parse_reward("vader_positive")
    for p, o in zip(PROMPTS, a):
        assert 0 < len(o.token_ids) <= MAX_TOKENS and o.decisions == 2
        assert o.kl_bound == pytest.approx(2 * (math.log(3) - 2 / 3))
        assert o.reward == pytest.approx(reward.score([p], [o.text])[0])   # the reward decided last
    # every continuation was generated and counted, discarded ones included
    assert stats.gen_tokens == sum(o.gen_tokens for o in a) and stats.gen_tokens > 2 * sum(len(o.token_ids) for o in a)
    assert stats.requests == 2 * len(PROMPTS) and stats.value_tokens > 0 and stats.cached_known
    # value only, no reward at the end: the answer's score is V(prompt + answer), equal to a full
    # recompute (the scorer's cache was continued across blocks and forks)
    value = _value_reference(positive)
    c = searcher.generate(PROMPTS, MAX_TOKENS, seed=3, search_final="scorer", **KNOBS)
    tok = llm.get_tokenizer()
    for p, o in zip(PROMPTS, c):
        assert o.reward is None
        want, bound = value(tok(p)["input_ids"] + o.token_ids)
        assert abs(o.score - want) <= bound, (o.score, want, bound)


def _engine_counters(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics()
            if m.name in ("vllm:prompt_tokens", "vllm:prefix_cache_hits")}


@pytest.mark.parametrize("k", [2, 3])
def test_offline_prefix_cache_serves_particles(llm, positive, k):
    """Particles go back as token ids: the second block's prompts (a prompt of more than one
    32-token cache block) hit the prefix cache (num_cached_tokens), and only the tail is recomputed,
    once per sample. The run's prompt and cached tokens equal the engine's own counters."""
    from vas_vllm.search import Searcher

    searcher = Searcher(llm, reward="vader_positive", max_len=256)
    prompt = (f"A long and detailed story ({k}) about the old city where I grew up as a child, with its "
              "narrow streets, its markets, the river, the bridges, the school and the people I knew, and")
    assert len(llm.get_tokenizer()(prompt)["input_ids"]) > 32
    before = _engine_counters(llm)
    searcher.generate([prompt, "My day"], 24, seed=1, search_k=k, search_blocks=2, search_scorer="reward")
    after = _engine_counters(llm)
    s = searcher.last_stats
    assert s.cached_known and s.cached_exact and s.cached_tokens > 0 and s.recomputed_tokens < s.prompt_tokens, s
    assert s.prompt_tokens == after["vllm:prompt_tokens"] - before["vllm:prompt_tokens"], (s, before, after)
    assert s.cached_tokens == after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"], (s, before, after)


@pytest.mark.parametrize("knobs,match", [
    ({"search_k": 0}, "search_k"), ({"search_rule": "beam"}, "search_rule"),
    ({"search_scorer": "nope"}, "search_scorer"), ({"search_block_tokens": [5, 5]}, "search_block_tokens"),
    ({"search_tau": 0.5}, "search_tau"), ({"search_blocks": 99}, "search_blocks"), ({"search_kk": 1}, "search_kk"),
])
def test_offline_bad_knobs_name_the_knob(llm, positive, knobs, match):
    from vas_vllm.search import Searcher

    searcher = Searcher(llm, value_models={"positive": str(positive)}, max_len=256)
    with pytest.raises(SearchKnobError, match=match):
        searcher.generate(PROMPTS, MAX_TOKENS, **knobs)
    with pytest.raises(SearchKnobError, match="search_final 'reward' needs a reward"):
        searcher.generate(PROMPTS, MAX_TOKENS, search_final="reward")
    with pytest.raises(SearchKnobError, match="max_len"):
        searcher.generate(["word " * 250], 12, search_k=2)


def test_remote_search_over_vllm_serve(upstream, smollm2_dir, positive):
    from vas_vllm.search import RemoteSearcher

    searcher = RemoteSearcher(upstream.url, NAME, tokenizer=str(smollm2_dir), value_models={"positive": str(positive)},
                              reward="vader_positive", max_slots=16, max_len=256, concurrency=1)
    a = searcher.generate(PROMPTS, MAX_TOKENS, seed=5, **KNOBS)
    b = searcher.generate(PROMPTS, MAX_TOKENS, seed=5, **KNOBS)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(o.decisions == 2 and o.reward is not None and o.token_ids for o in a)
    s = searcher.last_stats
    assert s.requests == 2 * len(PROMPTS) and s.cached_known, s


def test_search_cli_writes_answers_and_stats(upstream, smollm2_dir, positive, tmp_path):
    import json

    from vas_vllm.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["search", "--base-url", upstream.url, "--model", NAME, "--tokenizer", str(smollm2_dir),
                 "--value-model", f"positive={positive}", "--reward", "vader_positive", "--prompts", str(prompts),
                 "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--knob", "search_k=2", "--quiet"])
    assert code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in lines[:-1]] == PROMPTS and "stats" in lines[-1]
    assert main(["search", "--base-url", upstream.url, "--model", NAME, "--tokenizer", str(smollm2_dir),
                 "--prompts", str(prompts), "--out", str(out), "--knob", "search_k=0", "--quiet"]) == 2


def test_serving_front_with_the_openai_client(fronts, upstream):
    client = openai.OpenAI(base_url=fronts["reward"].url + "/v1", api_key="-")
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, seed=7, n=2,
                                  extra_body={"vllm_xargs": KNOBS})
    assert len(r.choices) == 2 and all(c.text for c in r.choices)
    info = r.model_extra["search"] if r.model_extra else None
    assert info and info["gen_tokens"] > 0
    assert r.choices[0].model_extra["search"]["kl_bound"] == pytest.approx(2 * (math.log(3) - 2 / 3))
    again = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, seed=7, n=2,
                                      extra_body={"vllm_xargs": KNOBS})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say something nice."}],
                                          max_tokens=MAX_TOKENS, seed=1, extra_body={"vllm_xargs": KNOBS})
    assert chat.choices[0].message.content and chat.choices[0].model_extra["search"]["decisions"] >= 1
    # no search knob: passed through to vLLM unchanged
    plain = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=8, seed=11)
    direct = openai.OpenAI(base_url=upstream.url + "/v1", api_key="-").completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=8, seed=11)
    assert plain.choices[0].text == direct.choices[0].text and "search" not in (plain.model_extra or {})
    log = fronts["reward"].log.read_text()
    assert "Received search request" in log and "Finished search request" in log


@pytest.mark.parametrize("body,param", [
    ({"vllm_xargs": {"search_k": 0}}, "search_k"),
    ({"vllm_xargs": {"search_k": 2, "search_model": "x"}}, "search_model"),
    ({"vllm_xargs": {"search_k": 2}, "stream": True}, "stream"),
    ({"vllm_xargs": {"search_k": 2}, "top_p": 0.5}, "top_p"),
    ({"vllm_xargs": {"search_k": 2, "vas_beta": 2}}, "vas_beta"),
])
def test_serving_front_refuses_bad_requests_with_a_400(fronts, body, param):
    r = httpx.post(fronts["reward"].url + "/v1/completions",
                   json={"model": NAME, "prompt": "Hi", "max_tokens": 8, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]["message"]


def test_a_search_needing_the_reward_gets_a_400_where_none_is_configured(fronts):
    client = openai.OpenAI(base_url=fronts["none"].url + "/v1", api_key="-")
    for knobs in ({"search_k": 2, "search_final": "reward"}, {"search_k": 2, "search_scorer": "reward"}):
        with pytest.raises(openai.BadRequestError, match="needs a reward"):
            client.completions.create(model=NAME, prompt="Hi", max_tokens=8, extra_body={"vllm_xargs": knobs})
    # the value model alone makes every decision there
    r = client.completions.create(model=NAME, prompt="Hi", max_tokens=8, seed=2,
                                  extra_body={"vllm_xargs": {"search_k": 2}})
    assert r.choices[0].model_extra["search"]["reward"] is None
