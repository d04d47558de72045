"""check_compatible: the value model must share the generator's vocabulary and be a 1-label
Llama sequence classifier."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from value_models import IncompatibleValueModelError, MetadataError, check_compatible


def _copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_matching_pair_accepted(tiny_pair: tuple[Path, Path], smollm2_tokenizer: Path) -> None:
    gen_dir, value_dir = tiny_pair
    meta = check_compatible(value_dir, gen_dir)
    assert meta.generator_vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    assert check_compatible(value_dir, tok, generator_vocab_size=49152) == meta
    assert check_compatible(str(value_dir), tok) == meta  # tokenizer only: fingerprint checked


def test_vocab_size_mismatch(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    gen_dir, value_dir = tiny_pair
    bigger = _copy_with_config(gen_dir, tmp_path / "bigger-gen", vocab_size=49280)
    with pytest.raises(IncompatibleValueModelError) as info:
        check_compatible(value_dir, bigger)
    msg = str(info.value)
    for part in (str(value_dir), str(bigger), "49152", "49280", "vocabulary size mismatch"):
        assert part in msg, (part, msg)

    tok = AutoTokenizer.from_pretrained(gen_dir)
    with pytest.raises(IncompatibleValueModelError, match="vocab_size=49152.*vocab_size=50000"):
        check_compatible(value_dir, tok, generator_vocab_size=50000)


def test_tokenizer_mismatch(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    gen_dir, value_dir = tiny_pair
    # Same vocabulary size, different special ids: only the fingerprint can tell.
    other = tmp_path / "other-tok-gen"
    shutil.copytree(gen_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(other)
    with pytest.raises(IncompatibleValueModelError) as info:
        check_compatible(value_dir, other)
    msg = str(info.value)
    for part in (str(value_dir), str(other), "tokenizer mismatch", "sha256:"):
        assert part in msg, (part, msg)
    assert msg.count("sha256:") == 2, msg  # both fingerprints named

    extra = AutoTokenizer.from_pretrained(gen_dir)
    extra.add_tokens(["<vas_extra>"])
    with pytest.raises(IncompatibleValueModelError, match="tokenizer mismatch"):
        check_compatible(value_dir, extra, generator_vocab_size=49152)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]},
         "model_type 'gpt2'"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures \\['LlamaForCausalLM'\\]"),
        ({"id2label": {"0": "A", "1": "B"}, "label2id": {"A": 0, "B": 1}}, "num_labels=2"),
        ({"vocab_size": 1000}, "inconsistent: config.json vocab_size=1000 but vas.json"),
    ],
)
def test_not_a_value_model(tiny_pair: tuple[Path, Path], tmp_path: Path,
                           changes: dict[str, object], match: str) -> None:
    gen_dir, value_dir = tiny_pair
    bad = _copy_with_config(value_dir, tmp_path / "bad-value", **changes)
    with pytest.raises(IncompatibleValueModelError, match=match):
        check_compatible(bad, gen_dir)


def test_missing_metadata(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    gen_dir, value_dir = tiny_pair
    bare = tmp_path / "bare"
    shutil.copytree(value_dir, bare)
    (bare / "vas.json").unlink()
    with pytest.raises(MetadataError, match="vas.json not found"):
        check_compatible(bare, gen_dir)
