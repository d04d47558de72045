"""value_models.training.evaluate against a direct, uncached, one-sample-at-a-time recomputation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dataset_helpers import write_fake_dataset
from value_reference import RUNTIME_SLACK, Float64ValueModel
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
    _, value_dir = tiny_pair_random_head
    data = write_fake_dataset(tmp_path / "data", num_prompts=7, num_samples=4, seed=seed)
    score_dataset(data, REWARD)
    got = value_reward_correlation(value_dir, data, REWARD, batch_size=5, transform="bon_log_cdf")

    _, samples = load_samples(data)
    ref = Float64ValueModel(value_dir)
    full, last, full_b, last_b = [], [], [], []
    for s in samples:  # each text alone, in float64, with the float32 bound of its value
        ids = s["prompt_token_ids"] + s["response_token_ids"]
        for hist, vals, bounds in ((ids, full, full_b), (ids[:-1] or ids, last, last_b)):
            _, _, v, b = ref.bounded(hist, [])
            vals.append(float(v[0]))
            bounds.append(RUNTIME_SLACK * float(b[0]))   # evaluate runs HF's fused attention
    rewards = [1.0 if "good" in s["response"] else -1.0 for s in samples]
    target = _direct_log_cdf(rewards, [s["prompt_id"] for s in samples])

    def within(stat, values: list[float], bounds: list[float], got_value: float, what: str) -> None:
        """got_value (from float32 values) against stat(float64 values): first order, within
        Σ_i |∂stat/∂v_i| bound_i (+ float64 rounding of the statistic itself)."""
        v = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        want = stat(v)
        (grad,) = torch.autograd.grad(want, v)
        tol = float(grad.abs() @ torch.tensor(bounds, dtype=torch.float64)) + 1e-12
        assert abs(got_value - float(want)) <= tol, (what, got_value, float(want), tol)

    def corr(y: list[float]):
        y = torch.tensor(y, dtype=torch.float64)
        return lambda v: torch.corrcoef(torch.stack([v, y]))[0, 1]

    assert got["samples"] == len(samples) == 28 and got["prompts"] == 7
    within(corr(rewards), full, full_b, got["pearson_full"], "pearson_full")
    within(corr(rewards), last, last_b, got["pearson_last"], "pearson_last")
    within(corr(target), full, full_b, got["pearson_full_vs_target"], "pearson_full_vs_target")
    assert got["mean_target"] == pytest.approx(float(np.mean(target)), abs=1e-9)  # float64 logs of ranks
    t = torch.tensor(target, dtype=torch.float64)
    within(lambda v: ((v - t) ** 2).mean(), full, full_b, got["mse_full_vs_target"], "mse_full_vs_target")


def test_unknown_transform_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transform"):
        value_reward_correlation(tmp_path, tmp_path, REWARD, transform="log")
