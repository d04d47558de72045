"""Remote VAS against real `vllm serve` processes of the tiny generator WITHOUT the plugin.

Two servers start at once (tests/server_process.py: own process group, killed at teardown):
- `raw`: vLLM's default logprobs (log_softmax of the logits, before temperature);
- `processed`: `--logprobs-mode processed_logprobs` (after temperature); the fault test kills it.
The in-engine plugin runs in an offline `vllm.LLM` with the same value models and defaults; the
slow reference is tests/remote_bounded.py: the generator, the value models and the rules in
float64, each table entry with the float32 error bound of its computation.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
pytest.importorskip("httpx")

from server_process import Launch, free_ports, launch  # noqa: E402
from test_processor_v1 import BAD  # noqa: E402  (the plugin's bad-knob cases)
from remote_bounded import RemoteBounded  # noqa: E402
from vas_bounded import SLACK  # noqa: E402

from vas_vllm.knobs import KnobError  # noqa: E402
from vas_vllm.remote import (AsyncRemoteVAS, IncompatibleServerError, RemoteRequestError,  # noqa: E402
                             RemoteUnavailableError, RemoteVAS)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "tiny"
CFG = dict(max_top_k=32, default_top_k=6, default_beta=1.5)  # as the plugin engine below
SERVER_ARGS = ["--served-model-name", NAME, "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
               "--max-num-seqs", "8", "--block-size", "32", "--kv-cache-memory-bytes", str(1 << 23),
               "--seed", "0", "--disable-uvicorn-access-log", "--disable-log-stats"]
PROMPTS = ["The movie was", "I think that the weather today", "Once upon a time there"]
# (knobs, the reference's arguments)
GREEDY = [
    ({"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "a"}, dict(beta=2.0, top_k=5, models=["a"])),
    ({"vas_beta": 3.0, "vas_top_k": 10, "vas_model": ["a", "b"], "vas_weights": [0.5, 1.5]},
     dict(beta=3.0, top_k=10, models=["a", "b"], weights=[0.5, 1.5])),
    ({"vas_tilt": 3.0, "vas_top_k": 6, "vas_model": "dist"}, dict(beta=3.0, top_k=6, models=["dist"], mode="tilt")),
    ({"vas_bon_n": 16, "vas_top_k": 6, "vas_model": "dist"},
     dict(beta=15.0, top_k=6, models=["dist"], mode="bon", bon_n=16)),
    ({"vas_threshold": 0.2, "vas_top_k": 4, "vas_model": "dist", "vas_mask_outside_top_k": 1},
     dict(beta=0.0, top_k=4, models=["dist"], mode="threshold", taus=[0.2], mask=True)),
]
SAMPLED = [
    ({"vas_beta": 1.5, "vas_top_k": 5, "vas_model": "b"}, dict(beta=1.5, top_k=5, models=["b"])),
    ({"vas_tilt": 2.0, "vas_top_k": 6, "vas_model": "dist"}, dict(beta=2.0, top_k=6, models=["dist"], mode="tilt")),
    ({"vas_bon_n": 3, "vas_top_k": 6, "vas_model": ["dist", "bon"], "vas_weights": [0.5, 1.0]},
     dict(beta=2.0, top_k=6, models=["dist", "bon"], weights=[0.5, 1.0], mode="bon", bon_n=3)),
    ({"vas_threshold": 0.2, "vas_top_k": 5, "vas_model": "dist"},
     dict(beta=0.0, top_k=5, models=["dist"], mode="threshold", taus=[0.2])),
]


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(vas_models, tmp_path_factory) -> dict[str, Launch]:
    gen = vas_models[0]
    logs = tmp_path_factory.mktemp("remote-logs")
    raw_port, processed_port = free_ports(2)
    # One process per server (the engine core runs the model, as on a one-GPU host): the client
    # sees the same HTTP API, and each server starts two vLLM imports fewer on the 2 cores.
    uni, env = ["--distributed-executor-backend", "uni"], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = {"raw": launch("raw", gen, [*SERVER_ARGS, *uni], logs / "raw.log", raw_port, env=env),
           "processed": launch("processed", gen, [*SERVER_ARGS, *uni, "--logprobs-mode", "processed_logprobs"],
                               logs / "processed.log", processed_port, env=env)}
    try:
        for s in out.values():
            print(f"{s.name} healthy after {s.wait_healthy():.0f} s")
        yield out
    finally:
        for s in out.values():
            s.stop()


@pytest.fixture(scope="module")
def plugin(vas_models, servers):
    """The in-engine plugin on the same generator, value models and defaults."""
    import gc

    from vllm import LLM

    from vas_vllm import vas_engine_kwargs

    gen, values = vas_models
    engine = LLM(model=str(gen), dtype="float32", seed=0, enforce_eager=True, max_model_len=256,
                 max_num_seqs=8, kv_cache_memory_bytes=1 << 23, logprobs_mode="processed_logprobs",
                 **vas_engine_kwargs(value_models={k: str(v) for k, v in values.items()}, **CFG))
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


@pytest.fixture(scope="module")
def bounded(vas_models) -> RemoteBounded:
    return RemoteBounded(*vas_models)


def _remote(url: str, values: dict[str, Path], **kw) -> RemoteVAS:
    options = dict(concurrency=4, progress=False, max_retries=2, backoff_s=0.2, **CFG)
    return RemoteVAS(url, NAME, {k: str(v) for k, v in values.items()}, **{**options, **kw})


def _sp(**kw):
    from vllm import SamplingParams

    return SamplingParams(ignore_eos=True, **kw)


def _check_steps(bounded: RemoteBounded, prompt: list[int], tokens: list[int], steps, what: str,
                 plugin_log_p: list[list[float]] | None = None, **knobs) -> int:
    """Each step's remote table (and the plugin's processed log-probabilities of the same
    top-k, when given) within the float32 error bound of its computation (remote_bounded.py).
    Returns the steps not checked because a branch lies within rounding."""
    ill = 0
    for t, step in enumerate(steps):
        want = bounded.tables(prompt + tokens[:t], step.cand, prompt_len=len(prompt), **knobs)
        ill += want.ill is not None
        want.check_remote(step.log_p, f"{what} step {t}: remote table")
        if plugin_log_p is not None:
            want.check_plugin(plugin_log_p[t], f"{what} step {t}: plugin's processed log-probabilities")
    return ill


# ---- exactness ---------------------------------------------------------------------------------
def test_greedy_tokens_equal_the_plugins(servers, plugin, vas_models, bounded):
    vas = _remote(servers["raw"].url, vas_models[1])
    changed = False
    plain = plugin.generate(PROMPTS, _sp(temperature=0.0, max_tokens=12), use_tqdm=False)
    for knobs, ref_knobs in GREEDY:
        mine = vas.generate(PROMPTS, 12, 0.0, ignore_eos=True, trace=True, **knobs)
        theirs = plugin.generate(PROMPTS, _sp(temperature=0.0, max_tokens=12, extra_args=knobs), use_tqdm=False)
        for m, t, base in zip(mine, theirs, plain):
            ours, plugin_tokens = m.token_ids, list(t.outputs[0].token_ids)
            changed |= plugin_tokens != list(base.outputs[0].token_ids)
            if ours != plugin_tokens:   # then only a tie within rounding may split them
                _assert_tie(bounded, vas, m, ours, plugin_tokens, knobs, ref_knobs)
        # one batched top-k request per step for the three prompts, and no draw when greedy
        assert vas.last_stats.step_requests == 12 and vas.last_stats.draws == 0
    assert changed, "VAS changed no greedy text: the comparison would be moot"


def _assert_tie(bounded: RemoteBounded, vas: RemoteVAS, m, ours: list[int], plugin_tokens: list[int],
                knobs: dict, ref_knobs: dict) -> None:
    """The remote's argmax a and the plugin's b differ at their first split: the float64 values of
    the two must lie within rounding of each other, both ways. a is the remote's argmax, so
    f(b) - f(a) <= the bound of the remote's two table entries; b is the plugin's, so
    f(a) - f(b) <= the bound of the plugin's two entries. (Unless the step is ill.)"""
    s = next(i for i, (a, b) in enumerate(zip(ours, plugin_tokens)) if a != b)
    step = m.steps[s]
    what = f"{knobs} prompt {m.index}: remote {ours} vs plugin {plugin_tokens} (step {s})"
    assert plugin_tokens[s] in step.cand, f"{what}: the plugin's token is outside the remote's top-k"
    prompt_ids = list(vas.inner.tokenizer(PROMPTS[m.index])["input_ids"])
    want = bounded.tables(prompt_ids + ours[:s], step.cand, processed=False, temperature=0.0,
                          prompt_len=len(prompt_ids), **ref_knobs)
    if want.ill is not None:
        return
    a, b = step.cand.index(ours[s]), step.cand.index(plugin_tokens[s])
    gap = float(want.remote[b] - want.remote[a])   # = the plugin's f(b) - f(a) in exact arithmetic
    remote_within = SLACK * float(want.remote_bound[a] + want.remote_bound[b])
    plugin_within = SLACK * float(want.plugin_bound[a] + want.plugin_bound[b])
    assert gap <= remote_within, f"{what}: the remote's pick is {gap:.3g} below, beyond rounding {remote_within:.3g}"
    assert -gap <= plugin_within, f"{what}: the plugin's pick is {-gap:.3g} below, beyond rounding {plugin_within:.3g}"


def test_seeded_tables_equal_the_plugins_processed_logprobs(servers, plugin, vas_models, bounded):
    """Along the plugin's own seeded samples (T = 1), each remote step's table over the top-k and
    the rest, and the plugin's processed log-probabilities of those tokens at that prefix (asked
    with logprob_token_ids), are both within the float32 error bound of their computation from
    the float64 reference. Best-of-N is left to the reference test: asked at a prefix given as a
    prompt, the plugin would take its CDF at that prefix, not at the prompt."""
    from vllm.inputs import TokensPrompt

    vas = _remote(servers["raw"].url, vas_models[1])
    tok = plugin.get_tokenizer()
    seen_rest = ill = checked = 0
    for n, (knobs, ref_knobs) in enumerate(s for s in SAMPLED if s[1].get("mode") != "bon"):
        outs = plugin.generate(PROMPTS, _sp(temperature=1.0, max_tokens=10, seed=100 + n, extra_args=knobs),
                               use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            tokens = list(out.outputs[0].token_ids)
            steps = vas.tables(prompt, tokens, 1.0, **knobs)
            ids = list(tok(prompt)["input_ids"])
            queries = [TokensPrompt(prompt_token_ids=ids + tokens[:t]) for t in range(len(steps))]
            params = [_sp(temperature=1.0, max_tokens=1, logprob_token_ids=step.cand, extra_args=knobs)
                      for step in steps]
            theirs = [[res.outputs[0].logprobs[0][a].logprob for a in step.cand]
                      for step, res in zip(steps, plugin.generate(queries, params, use_tqdm=False))]
            ill += _check_steps(bounded, ids, tokens, steps, f"{knobs} {prompt!r}", theirs,
                                processed=False, temperature=1.0, **ref_knobs)
            checked += len(steps)
            seen_rest += sum(step.token not in step.cand for step in steps)
    assert seen_rest > 0, "no sample fell outside the top-k: the rest column was never exercised"
    assert ill <= checked // 10, f"{ill} of {checked} steps had a branch within rounding"


@pytest.mark.parametrize("server,temperature", [("raw", 1.0), ("processed", 0.7)])
def test_sampling_matches_the_reference_on_fresh_prompts(servers, vas_models, bounded, server, temperature):
    """Seeded sampling on random token-id prompts: every step's table is within the float32
    error bound of its computation from the float64 reference; at T = 0.7 the processed server
    makes the exact rules exact too."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    prompts = [rng.integers(0, 49152, size=int(rng.integers(3, 9))).tolist() for _ in range(2)]
    seed = int(rng.integers(1 << 30))
    vas = _remote(servers[server].url, vas_models[1])
    ill = checked = 0
    for knobs, ref_knobs in SAMPLED:
        outs = vas.generate(prompts, 8, temperature, seed=seed, ignore_eos=True, trace=True, **knobs)
        for prompt, out in zip(prompts, outs):
            ill += _check_steps(bounded, prompt, out.token_ids, out.steps, f"{knobs} prompt {prompt} seed {seed}",
                                processed=server == "processed", temperature=temperature, **ref_knobs)
            checked += len(out.steps)
    assert ill <= checked // 10, f"{ill} of {checked} steps had a branch within rounding"


def test_raw_logprobs_away_from_temperature_one(servers, vas_models, bounded):
    """Raw log-probabilities at T = 0.7: masked rows need no rest mass (table checked against the
    reference); the mean rule goes through the two-coin sampler; exact rules are refused."""
    vas = _remote(servers["raw"].url, vas_models[1])
    knobs = {"vas_beta": 2.0, "vas_top_k": 5, "vas_model": "a", "vas_mask_outside_top_k": 1}
    (out,) = vas.generate(PROMPTS[:1], 6, 0.7, ignore_eos=True, trace=True, **knobs)
    prompt_ids = list(vas.inner.tokenizer(PROMPTS[0])["input_ids"])
    ill = _check_steps(bounded, prompt_ids, out.token_ids, out.steps, "mask at T = 0.7", processed=False,
                       temperature=0.7, beta=2.0, top_k=5, models=["a"], mask=True)
    assert ill <= 1, f"{ill} of 6 steps had a branch within rounding"
    outs = vas.generate(PROMPTS, 6, 0.7, ignore_eos=True, trace=True, vas_beta=2.0, vas_top_k=5)
    assert all(len(o.token_ids) == 6 and all(s.log_p is None for s in o.steps) for o in outs)
    stats = vas.last_stats
    assert stats.step_requests == 6 and stats.requests >= stats.step_requests + stats.draws  # batched
    with pytest.raises(IncompatibleServerError, match=r"exact rule \(tilt\) at temperature 0.7.*raw_logprobs"):
        vas.generate(PROMPTS, 4, 0.7, vas_tilt=2.0, vas_model="dist")


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "per-prompt"])
def test_async_variant_gives_the_same_samples_at_any_concurrency(servers, vas_models, batch):
    """Seeds are per prompt and position: the same tokens at concurrency 3 and 1, blocking or
    async; with per-prompt requests the step's own sample serves the rest draws (fewer draws)."""
    import asyncio

    knobs = {"vas_beta": 1.0, "vas_top_k": 8, "vas_model": "a"}
    sync = _remote(servers["raw"].url, vas_models[1], concurrency=3, batch_requests=batch)
    sync_out = sync.generate(PROMPTS, 8, 1.0, seed=7, **knobs)
    stats = sync.last_stats
    assert stats.step_requests == (8 if batch else 8 * len(PROMPTS)), stats
    inner = AsyncRemoteVAS(servers["raw"].url, NAME, {"a": str(vas_models[1]["a"])}, concurrency=1,
                           progress=False, batch_requests=batch, **CFG)
    async_out = asyncio.run(inner.generate(PROMPTS, 8, 1.0, seed=7, **knobs))
    assert [o.token_ids for o in sync_out] == [o.token_ids for o in async_out]
    assert inner.last_stats.step_requests == 8 * len(PROMPTS)
    other_seed = _remote(servers["raw"].url, vas_models[1], batch_requests=batch).generate(PROMPTS, 8, 1.0, seed=8, **knobs)
    assert [o.token_ids for o in other_seed] != [o.token_ids for o in sync_out]


# ---- refusals and faults -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def unreachable(vas_models) -> RemoteVAS:
    """Remote VAS pointed at a port nothing listens on: any request ends in RemoteUnavailableError."""
    return _remote(f"http://127.0.0.1:{free_ports(1)[0]}", vas_models[1], max_retries=0)


@pytest.mark.parametrize("extra_args,knob", BAD, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD)])
def test_bad_knobs_are_refused_before_any_request_with_the_plugins_message(plugin, unreachable, extra_args, knob):
    from vllm.exceptions import VLLMValidationError

    vas = unreachable
    with pytest.raises(KnobError, match=knob) as mine:
        vas.generate(["hi"], 2, 1.0, **extra_args)
    with pytest.raises(VLLMValidationError) as theirs:
        plugin.generate(["hi"], _sp(max_tokens=2, extra_args=extra_args), use_tqdm=False)
    assert str(mine.value) in str(theirs.value)


def test_start_up_refuses_mismatches(servers, vas_models, tmp_path):
    from value_models.fingerprint import tokenizer_fingerprint
    from value_models.metadata import VASMetadata
    from transformers import AutoTokenizer

    url, values = servers["raw"].url, vas_models[1]
    with pytest.raises(IncompatibleServerError, match=r"needs the top 25 .*limit is 20.*--max-logprobs 25"):
        _remote(url, values).generate(PROMPTS, 2, 1.0, vas_top_k=25)
    with pytest.raises(IncompatibleServerError, match=r"greedy with an exact rule: k \+ 1.*top 21"):
        _remote(url, values).generate(PROMPTS, 2, 0.0, vas_top_k=20, vas_tilt=1.0, vas_model="dist")
    with pytest.raises(IncompatibleServerError, match=r"model 'nope' is not served at .*\['tiny'\]"):
        RemoteVAS(url, "nope", {"a": str(values["a"])}, progress=False).generate(PROMPTS, 2)
    # a value model made for a vocabulary of 49216
    padded = tmp_path / "padded"
    shutil.copytree(values["a"], padded)
    meta = VASMetadata.load(padded)
    meta.generator_vocab_size = 49216
    meta.save(padded)
    with pytest.raises(IncompatibleServerError, match=r"vocab_size=49152, the value models \(a\) were made for vocab_size=49216"):
        _remote(url, {"a": padded}).generate(PROMPTS, 2)
    # a value model whose tokenizer maps two tokens the other way round
    swapped = tmp_path / "swapped"
    shutil.copytree(values["a"], swapped)
    tok_file = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok_file["model"]["vocab"]
    vocab["Hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["Hello"]
    (swapped / "tokenizer.json").write_text(json.dumps(tok_file))
    meta = VASMetadata.load(swapped)
    meta.tokenizer_fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(swapped))
    meta.save(swapped)
    with pytest.raises(IncompatibleServerError, match=r"tokenizer mismatch: 'tiny' at .* first differ at token 0"):
        _remote(url, {"a": swapped}).generate(PROMPTS, 2)


def test_a_400_passes_through_naming_its_cause(servers, vas_models, tmp_path):
    vas = _remote(servers["raw"].url, vas_models[1])
    long_prompt = list(range(1000, 1250))  # 250 tokens; max_model_len 256
    out = tmp_path / "out.jsonl"
    with pytest.raises(RemoteRequestError, match=r"prompt 1, new token 6, 256 tokens so far, the server's "
                       r"max_model_len is 256\).*HTTP 400: .*max_tokens") as e:
        vas.generate([[5, 6, 7], long_prompt], 10, 1.0, out=out, ignore_eos=True, vas_top_k=4)
    assert e.value.status == 400
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()[1:]] == [], \
        "no prompt had finished when the error came (both run in lockstep)"


def test_killed_server_keeps_finished_texts_and_a_rerun_resumes(servers, vas_models, tmp_path):
    victim, survivor = servers["processed"], servers["raw"]
    out = tmp_path / "steered.jsonl"
    prompts = [f"Prompt number {i} says" for i in range(6)]
    knobs = {"vas_beta": 1.0, "vas_top_k": 5}
    vas = _remote(victim.url, vas_models[1], concurrency=2, max_retries=2, backoff_s=0.3)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            vas.generate(prompts, 6, 1.0, out=out, ignore_eos=True, **knobs)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and worker.is_alive():
        if out.exists() and len(out.read_text().splitlines()) >= 3:  # header + 2 texts
            break
        time.sleep(0.05)
    victim.stop()
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], (RemoteUnavailableError, RemoteRequestError)), errors
    assert "rerun to resume" in str(errors[0]) or isinstance(errors[0], RemoteRequestError), str(errors[0])
    kept = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert 2 <= len(kept) < 6, f"{len(kept)} texts finished before the kill"
    again = _remote(survivor.url, vas_models[1], concurrency=2)
    results = again.generate(prompts, 6, 1.0, out=out, ignore_eos=True, **knobs)
    assert again.last_stats.prompts == 6 - len(kept)  # only the missing ones were generated
    for row in kept:
        assert results[row["index"]].token_ids == row["token_ids"]
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert sorted(r["index"] for r in rows) == list(range(6)) and all(len(r["token_ids"]) == 6 for r in rows)


def test_cli_writes_and_resumes(servers, vas_models, tmp_path, capsys):
    from vas_vllm.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nMy day was\n")
    out = tmp_path / "out.jsonl"
    argv = ["remote", "--base-url", servers["raw"].url + "/v1", "--model", NAME,
            "--value-model", f"a={vas_models[1]['a']}", "--prompts", str(prompts), "--out", str(out),
            "--max-tokens", "5", "--temperature", "0", "--knob", "vas_beta=2", "--knob", "vas_top_k=5",
            "--ignore-eos", "--quiet"]
    assert main(argv) == 0
    assert "2 prompts, 10 tokens" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["remote_vas"]["knobs"] == {"vas_beta": 2, "vas_top_k": 5}
    assert [len(r["token_ids"]) for r in rows[1:]] == [5, 5]
    assert main(argv) == 0 and "0 prompts, 0 tokens" in capsys.readouterr().out  # resumed: nothing left
    assert main([*argv, "--knob", "vas_top_k=0"]) == 2
    assert "vas_top_k must be in [1, 64], found 0" in capsys.readouterr().err
