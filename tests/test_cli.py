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


def test_make_refuses_too_many_layers(tiny_pair, tmp_path, capsys):
    gen, _ = tiny_pair
    with pytest.raises(ValueError, match=r"num_layers must be an int in 1..2"):
        main(["make-value-model", str(gen), str(tmp_path / "vm"), "--layers", "3"])
    assert main(["make-value-model", str(gen), str(tmp_path / "vm")]) == 2
    assert "--layers is required without --base" in capsys.readouterr().err


def test_make_from_a_base_model_keeps_its_layers(tiny_pair, tmp_path):
    """--base: the value model is the base LM (here the tiny generator itself, 2 layers)."""
    from value_models.metadata import VASMetadata

    gen, _ = tiny_pair
    assert main(["make-value-model", str(gen), str(tmp_path / "vm"), "--base", str(gen)]) == 0
    assert VASMetadata.load(tmp_path / "vm").training["init"]["num_layers"] == 2


def test_console_script_help_lists_every_command():
    exe = Path(sys.executable).parent / "vas-vllm"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("make-value-model", "check", "embedded"):
        assert command in out


# ---- training commands ---------------------------------------------------------------------

from value_models.training.train_config import PipelineConfig, SampleConfig, ScoreConfig, TrainConfig  # noqa: E402
from vas_vllm.cli import build_parser  # noqa: E402


def _help(*argv: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return ""


@pytest.mark.parametrize("command,cls", [("sample", SampleConfig), ("score", ScoreConfig),
                                         ("train", TrainConfig)])
def test_step_help_documents_every_option(command, cls, capsys):
    _help(command)
    out = "".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name, field in cls.model_fields.items():
        assert f"--{name.replace('_', '-')}" in out, name
        assert "".join(field.description.split()) in out, f"{name}: help lacks its description"


def test_train_all_help_has_prefixed_options(capsys):
    _help("train-all")
    out = capsys.readouterr().out
    for step, cls in (("sample", SampleConfig), ("score", ScoreConfig), ("train", TrainConfig)):
        for name in cls.model_fields:
            assert f"--{step}.{name.replace('_', '-')}" in out


def test_console_script_lists_training_commands():
    exe = Path(sys.executable).parent / "vas-vllm"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("sample", "score", "train", "train-all"):
        assert command in out


def test_score_from_yaml_with_flag_override(tmp_path, capsys):
    from dataset_helpers import write_fake_dataset

    data = write_fake_dataset(tmp_path / "data", num_prompts=3, num_samples=2)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"sample:\n  out: {data}\n  prompts: unused.txt\n"
                   "score:\n  reward: py:dataset_helpers:good_reward\n  batch_size: 100\n"
                   "train:\n  out: unused\n")
    assert main(["score", "--config", str(cfg), "--batch-size", "2"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "scores.py_dataset_helpers_good_reward-" + path.name.split("-")[-1]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6 and {x["score"] for x in lines} <= {1.0, -1.0}


def test_pipeline_links_steps_and_bad_config_exits_2(tmp_path, capsys):
    cfg = PipelineConfig.model_validate({
        "sample": {"out": "d", "prompts": "p.txt"}, "score": {"reward": "textblob_polarity"},
        "train": {"out": "m"}})
    assert (cfg.score.data, cfg.train.data, cfg.train.reward) == ("d", "d", "textblob_polarity")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  data: d\n  out: m\n  lam: 1.5\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "vas-vllm train: invalid configuration" in err and "lam" in err
    assert main(["sample", "--out", "x"]) == 2
    assert "prompts" in capsys.readouterr().err
