"""value_models.training.evaluate against a direct, uncached, one-sample-at-a-time recomputation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dataset_helpers import write_fake_dataset
from value_models.training.evaluate import value_reward_correlation
from value_models.training.rewards import score_dataset
from value_models.training.sampling import load_samples

REWARD = "py:tests.dataset_helpers:good_reward"


def _direct_log_cdf(rewards: list[float], groups: list[int]) -> list[float]:
    """log F with mid-rank ties, one sample at a time."""
    out = []
    for r, g in zip(rewards, groups):
        peers = [q for q, h in zip(rewards, groups) if h == g]
        below = sum(q < r for q in peers)
        equal = sum(q == r for q in peers)
        out.append(math.log((below + 0.5 * equal) / len(peers)))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_and_bon_target_match_a_direct_loop(
        tmp_path: Path, tiny_pair_random_head: tuple[Path, Path], seed: int) -> None:
    from transformers import LlamaForSequenceClassification

    _, value_dir = tiny_pair_random_head
    data = write_fake_dataset(tmp_path / "data", num_prompts=7, num_samples=4, seed=seed)
    score_dataset(data, REWARD)
    got = value_reward_correlation(value_dir, data, REWARD, batch_size=5, transform="bon_log_cdf")

    _, samples = load_samples(data)
    model = LlamaForSequenceClassification.from_pretrained(value_dir, dtype=torch.float32).eval()
    full, last = [], []
    with torch.no_grad():
        for s in samples:  # each text alone: no padding, no batching
            ids = s["prompt_token_ids"] + s["response_token_ids"]
            full.append(float(model(torch.tensor([ids])).logits[0, 0]))
            last.append(float(model(torch.tensor([ids[:-1] or ids])).logits[0, 0]))
    rewards = [1.0 if "good" in s["response"] else -1.0 for s in samples]
    target = _direct_log_cdf(rewards, [s["prompt_id"] for s in samples])

    def corr(x: list[float], y: list[float]) -> float:
        return float(np.corrcoef(x, y)[0, 1])

    assert got["samples"] == len(samples) == 28 and got["prompts"] == 7
    assert got["pearson_full"] == pytest.approx(corr(full, rewards), abs=1e-5)
    assert got["pearson_last"] == pytest.approx(corr(last, rewards), abs=1e-5)
    assert got["pearson_full_vs_target"] == pytest.approx(corr(full, target), abs=1e-5)
    assert got["mean_target"] == pytest.approx(float(np.mean(target)), abs=1e-9)
    assert got["mse_full_vs_target"] == pytest.approx(
        float(np.mean((np.array(full) - np.array(target)) ** 2)), rel=1e-5)


def test_unknown_transform_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transform"):
        value_reward_correlation(tmp_path, tmp_path, REWARD, transform="log")
