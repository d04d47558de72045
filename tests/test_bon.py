"""The vBoN transform bon_log_cdf against a direct loop."""
from __future__ import annotations

import math
import random

import pytest

from value_models.training.bon import bon_log_cdf, empirical_cdf


def reference(rewards: list[float], groups: list[int]) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        mine = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        less = sum(x < r for x in mine)
        less_eq = sum(x <= r for x in mine)
        out.append(math.log((less + less_eq) / (2 * len(mine))))
    return out


def test_matches_loop_with_ties_and_ragged_groups() -> None:
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 60)
        groups = [rng.randint(0, 6) for _ in range(n)]
        # small integer rewards so ties are common; some float ones too
        rewards = [float(rng.randint(-2, 2)) if rng.random() < 0.7 else rng.gauss(0, 1) for _ in range(n)]
        got = bon_log_cdf(rewards, groups)
        assert got == pytest.approx(reference(rewards, groups), abs=1e-12)  # float64 logs of ranks / M: ~1e-16
        assert all(math.isfinite(x) and x < 0 for x in got)


def test_known_values() -> None:
    # M = 4 distinct rewards: F = 1/8, 3/8, 5/8, 7/8 by rank
    assert empirical_cdf([0.3, -1.0, 2.0, 0.5]) == [3 / 8, 1 / 8, 7 / 8, 5 / 8]
    # all tied: everyone sits in the middle
    assert empirical_cdf([1.0, 1.0, 1.0]) == [0.5, 0.5, 0.5]
    # a lone sample
    assert bon_log_cdf([5.0], ["x"]) == [math.log(0.5)]
    # groups are independent
    assert bon_log_cdf([1.0, 2.0, 100.0, -100.0], [0, 0, 1, 1]) == pytest.approx(  # float64: rel 1e-6 ample
        [math.log(1 / 4), math.log(3 / 4), math.log(3 / 4), math.log(1 / 4)])


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="got 2 rewards but 1 group labels"):
        bon_log_cdf([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="rewards must be finite"):
        bon_log_cdf([float("nan")], [0])
