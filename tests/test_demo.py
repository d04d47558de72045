"""The demo (`make demo`), cut down: two separate processes with the same seeds print the same
per-method means, and each says what identifies its inputs (commit, model-folder hashes,
versions, the CPU's kernel path)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vas_vllm.local_engine import engine_dtype

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ARGS = ["--prompts", "3", "--max-tokens", "8", "--betas", "4", "--search-k", "2", "--search-scorers", "reward",
        "positive", "positive-residual", "--bon", "2", "--seeds", "0", "1", "--show", "1"]


def test_two_processes_give_the_same_means_and_identify_their_inputs(tmp_path, vas_cache, smollm2_dir,
                                                                     smollm2_tokenizer):
    # Both processes at once, one OpenMP thread each: with torch's default of one thread per core
    # each, the two spin-wait against each other on the 2 cores (95 s instead of 69 here). The
    # generator (~30 s to build) is linked into the session's cache from the machine's; each
    # process builds the value model itself (the build race has its own test in test_embedded).
    for built in (smollm2_dir, smollm2_tokenizer):
        link = vas_cache / built.name
        if not link.exists():
            link.symlink_to(built, target_is_directory=True)
    procs = []
    for i in range(2):
        out = tmp_path / f"demo{i}.json"
        log = open(tmp_path / f"demo{i}.log", "w")
        procs.append((out, log, subprocess.Popen([sys.executable, "-m", "vas_vllm.demo", *ARGS, "--out", str(out)],
                                                 stdout=log, stderr=subprocess.STDOUT,
                                                 env={**os.environ, "OMP_NUM_THREADS": "1"},
                                                 cwd=Path(__file__).resolve().parents[1])))
    runs = []
    for out, log, proc in procs:
        code = proc.wait(timeout=800)
        log.close()
        text = Path(log.name).read_text()
        assert code == 0, text[-3000:]
        assert "=== what this run used ===" in text and "models (sha256 of each folder): generator" in text
        assert "engine dtype " in text
        runs.append(json.loads(out.read_text()))
    a, b = runs
    assert list(a["results"]) == ["plain", "vas beta=4", "search 2x4x2 reward", "search 2x4x2 positive",
                                  "search 2x4x2 positive-residual", "best-of-2"]
    for name in a["results"]:
        assert a["results"][name]["per_seed"] == b["results"][name]["per_seed"], name
    prov = a["provenance"]
    assert prov == b["provenance"]
    assert set(prov["models"]) == {"generator", "positive", "positive-residual"} and all(len(m["hash"]) == 12 for m in prov["models"].values())
    assert prov["versions"]["torch"] and prov["cpu"]["model"]
    assert prov["dtype"] == engine_dtype("auto")
    with pytest.raises(subprocess.CalledProcessError) as bad:   # refused by argparse, naming the knob
        subprocess.run([sys.executable, "-m", "vas_vllm.demo", "--search-scorers", "positive-dist"], check=True,
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert "--search-scorers: invalid choice: 'positive-dist'" in bad.value.stderr


@pytest.mark.parametrize("cuda,avx512_bf16,amx,expected", [
    (True, False, False, "bfloat16"), (False, True, False, "bfloat16"), (False, False, True, "bfloat16"),
    (False, False, False, "float32")])
def test_auto_dtype_is_bf16_only_where_it_is_native(monkeypatch, cuda, avx512_bf16, amx, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert engine_dtype("auto") == expected
    assert engine_dtype("bfloat16") == "bfloat16" and engine_dtype("float32") == "float32"
