"""The demo (`make demo`), cut down: two separate processes with the same seeds print the same
per-method means, and each says what identifies its inputs (commit, model-folder hashes,
versions, the CPU's kernel path)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ARGS = ["--prompts", "3", "--max-tokens", "8", "--betas", "4", "--search-k", "2", "--search-scorers", "reward",
        "positive", "--bon", "2", "--seeds", "0", "1", "--show", "1"]


def test_two_processes_give_the_same_means_and_identify_their_inputs(tmp_path, smollm2_dir):
    # both processes at once (2 cores); each builds what it needs into the session's cache
    procs = []
    for i in range(2):
        out = tmp_path / f"demo{i}.json"
        log = open(tmp_path / f"demo{i}.log", "w")
        procs.append((out, log, subprocess.Popen([sys.executable, "-m", "vas_vllm.demo", *ARGS, "--out", str(out)],
                                                 stdout=log, stderr=subprocess.STDOUT,
                                                 cwd=Path(__file__).resolve().parents[1])))
    runs = []
    for out, log, proc in procs:
        code = proc.wait(timeout=800)
        log.close()
        text = Path(log.name).read_text()
        assert code == 0, text[-3000:]
        assert "=== what this run used ===" in text and "models (sha256 of each folder): generator" in text
        runs.append(json.loads(out.read_text()))
    a, b = runs
    assert list(a["results"]) == ["plain", "vas beta=4", "search 2x4x2 reward", "search 2x4x2 positive", "best-of-2"]
    for name in a["results"]:
        assert a["results"][name]["per_seed"] == b["results"][name]["per_seed"], name
    prov = a["provenance"]
    assert prov == b["provenance"]
    assert set(prov["models"]) == {"generator", "positive"} and all(len(m["hash"]) == 12 for m in prov["models"].values())
    assert prov["versions"]["torch"] and prov["cpu"]["model"]
