"""The `vas-vllm` command line: make a value model, check it against its generator, and refuse
one made for another vocabulary."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vas_vllm.cli import main


def test_make_then_check(tiny_pair, tmp_path, capsys):
    gen, _ = tiny_pair
    out = tmp_path / "vm"
    assert main(["make-value-model", str(gen), str(out), "--layers", "2", "--beta", "2.5", "--top-k", "7"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / "vas.json").read_text())
    assert (meta["default_beta"], meta["default_top_k"]) == (2.5, 7)
    assert main(["check", str(gen), str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {out} fits {gen}")


def test_check_refuses_a_foreign_vocabulary(tiny_pair, tmp_path, capsys):
    gen, value = tiny_pair
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for f in value.iterdir():
        (foreign / f.name).write_bytes(f.read_bytes())
    meta = json.loads((foreign / "vas.json").read_text())
    meta["generator_vocab_size"] = 32000
    (foreign / "vas.json").write_text(json.dumps(meta))
    assert main(["check", str(gen), str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vas-vllm check: ") and "32000" in err and "49152" in err, err


def test_make_refuses_too_many_layers(tiny_pair, tmp_path):
    gen, _ = tiny_pair
    with pytest.raises(ValueError, match=r"num_layers must be an int in 1..2"):
        main(["make-value-model", str(gen), str(tmp_path / "vm"), "--layers", "3"])


def test_console_script_help_lists_every_command():
    exe = Path(sys.executable).parent / "vas-vllm"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("make-value-model", "check", "embedded"):
        assert command in out
