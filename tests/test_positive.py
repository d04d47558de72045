"""The embedded value model "positive": a small shipped artifact that rebuilds a full value-model
folder for the embedded SmolLM2, usable by the runtime and scoring happy text above sad text."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from fp_bounds import assert_within
from value_models.compat import check_compatible
from value_reference import RUNTIME_SLACK, Float64ValueModel
from value_models.embedded import ARTIFACTS, build_positive, build_positive_bon
from value_models.metadata import VASMetadata

PAIRS = [
    ("What a wonderful day, I love it and I am so happy", "What a horrible day, I hate it and I am so sad"),
    ("Thanks, this is great news, awesome!", "Ugh, this is terrible news, awful!"),
    ("The movie was beautiful and fun", "The movie was boring and ugly"),
]


@pytest.mark.parametrize("name", ["positive", "positive-bon", "positive-dist", "positive-residual"])
def test_artifact_is_small(name: str) -> None:
    files = {f.name: f.stat().st_size for f in (ARTIFACTS / name).iterdir()}
    assert {"lora_delta.safetensors", "vas.json", "README.md"} <= set(files), files
    assert sum(files.values()) <= 20e6, files


@pytest.mark.slow
def test_build_positive(user_cache: Path, smollm2_dir: Path) -> None:
    folder = build_positive(cache=user_cache)
    t0 = time.perf_counter()
    assert build_positive(cache=user_cache) == folder and time.perf_counter() - t0 < 1.0
    meta = check_compatible(folder, smollm2_dir)
    assert meta.reward == "vader_positive" and meta.generator == "embedded:smollm2"
    assert meta == VASMetadata.load(ARTIFACTS / "positive")

    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from value_models.training.trainer import position_values

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 4
    with torch.no_grad():
        values = [[float(position_values(model, torch.tensor([tok(t).input_ids]))[0, -1]) for t in pair]
                  for pair in PAIRS]
    assert all(good > bad for good, bad in values), values

    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(folder, max_slots=1, max_len=64, max_candidates=2)
    ids = tok(PAIRS[0][0]).input_ids
    got = rt.score([rt.allocate()], [ids[:-1]], torch.tensor([[ids[-1], 2]]))       # [1, 2]
    # a plain forward in float64, within the float32 error bound of that computation
    want, bound, _, _ = Float64ValueModel(folder).bounded(ids[:-1], [ids[-1], 2], None)
    assert_within(got[0], want[:, 0], RUNTIME_SLACK * bound[:, 0], "runtime vs plain forward")


@pytest.mark.slow
def test_build_positive_bon(user_cache: Path, smollm2_dir: Path) -> None:
    """The vBoN twin: same generator and reward, trained on log F_x(r), so vas_bon_n is allowed;
    its values still rank happy text above sad text."""
    folder = build_positive_bon(cache=user_cache)
    assert folder != build_positive(cache=user_cache)
    meta = check_compatible(folder, smollm2_dir)
    assert meta.reward_transform == "bon_log_cdf" and meta.reward_normalization is None
    assert meta == VASMetadata.load(ARTIFACTS / "positive-bon")

    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from value_models.training.trainer import position_values

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        values = [[float(position_values(model, torch.tensor([tok(t).input_ids]))[0, -1]) for t in pair]
                  for pair in PAIRS]
    assert all(good > bad for good, bad in values), values
    # V estimates E[log F] <= 0: a CDF value in (0, 1)
    assert all(v < 0.5 for pair in values for v in pair), values


@pytest.mark.slow
def test_build_positive_dist(user_cache: Path, smollm2_dir: Path) -> None:
    """The distributional twin: a probability over the shipped bins at every position, whose
    mean ranks happy text above sad text; the runtime's fused scoring returns the same
    distribution as a plain transformers forward."""
    from value_models.embedded import build_positive_dist

    folder = build_positive_dist(cache=user_cache)
    meta = check_compatible(folder, smollm2_dir)
    assert meta.distributional and meta == VASMetadata.load(ARTIFACTS / "positive-dist")
    bins = torch.tensor(meta.bins, dtype=torch.float32)
    assert len(bins) >= 8 and bool((bins[1:] > bins[:-1]).all())

    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from value_models.training.engine import score_positions

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.num_labels == len(bins)
    with torch.no_grad():
        probs = [[score_positions(model, torch.tensor([tok(t).input_ids]))[0, -1].softmax(-1) for t in pair]
                 for pair in PAIRS]
    means = [[float(p @ bins) for p in pair] for pair in probs]
    assert all(good > bad for good, bad in means), means

    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(folder, max_slots=1, max_len=64, max_candidates=2)
    ids = tok(PAIRS[0][0]).input_ids
    got = rt.score([rt.allocate()], [ids[:-1]], torch.tensor([[ids[-1], 2]]))       # [1, 2, B] logits
    assert got.shape == (1, 2, len(bins))
    # the bin logits: a plain forward in float64, within the float32 error bound of that computation
    want, bound, _, _ = Float64ValueModel(folder).bounded(ids[:-1], [ids[-1], 2], None)
    assert_within(got[0], want, RUNTIME_SLACK * bound, "runtime vs plain forward")


@pytest.mark.slow
def test_build_positive_residual(user_cache: Path, smollm2_dir: Path) -> None:
    """The residual twin, V = r + U: its metadata names the reward the plugin adds; the runtime's
    U equals a plain forward's; r + U ranks happy text above sad text, and U is a real
    correction (it moves V by more than float rounding)."""
    from value_models.embedded import build_positive_residual

    folder = build_positive_residual(cache=user_cache)
    meta = check_compatible(folder, smollm2_dir)
    assert meta.residual and meta.reward == "vader_positive" and not meta.distributional
    assert meta == VASMetadata.load(ARTIFACTS / "positive-residual")

    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from value_models.training.trainer import position_values
    from vas_vllm.residual import ResidualReward

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    residual = ResidualReward("positive-residual", meta, tok)
    with torch.no_grad():
        u = [[float(position_values(model, torch.tensor([tok(t).input_ids]))[0, -1]) for t in pair]
             for pair in PAIRS]
    r = [residual.standardised(residual.raw(["", ""], [tok(t).input_ids for t in pair])) for pair in PAIRS]
    values = [[ri + ui for ri, ui in zip(rp, up)] for rp, up in zip(r, u)]
    assert all(good > bad for good, bad in values), values
    assert max(abs(x) for pair in u for x in pair) > 1e-3, u

    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(folder, max_slots=1, max_len=64, max_candidates=2)
    ids = tok(PAIRS[0][0]).input_ids
    got = rt.score([rt.allocate()], [ids[:-1]], torch.tensor([[ids[-1], 2]]))       # [1, 2]: U
    want, bound, _, _ = Float64ValueModel(folder).bounded(ids[:-1], [ids[-1], 2], None)
    assert_within(got[0], want[:, 0], RUNTIME_SLACK * bound[:, 0], "runtime vs plain forward")
