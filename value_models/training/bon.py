"""The vBoN reward transform `bon_log_cdf`: r -> log F_x(r) over each prompt's own samples.

Variational Best-of-N (Amini et al., 2025) shows the Best-of-N distribution is the optimum of
E[log F_x(r)] - KL/(N-1), F_x the CDF of the reward under the reference policy for prompt x. So a
value model trained on log F_x(r) and decoded with beta = N - 1 approximates Best-of-N with one
sample. F_x is estimated from the M samples training draws for x anyway.

Choices (recorded in vas.json as reward_transform="bon_log_cdf"):
- Ties: the average of the strict and non-strict empirical CDFs,
      F(r_i) = ( #{j: r_j < r_i} + #{j: r_j <= r_i} ) / (2 M)  = (mid-rank_i + 0.5) / M,
  with mid-rank the 0-based rank, ties sharing the average of their ranks.
- Smoothing: none needed. r_i counts itself in the non-strict term, so F >= 1/(2M) and log F is
  finite; F <= 1 - 1/(2M), so the best sample is not a certainty. With M = 4 and distinct
  rewards, log F takes the values log(1/8), log(3/8), log(5/8), log(7/8).
Groups of one sample get F = 1/2. Pure Python; O(M log M) per prompt.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Sequence


def empirical_cdf(group: Sequence[float]) -> list[float]:
    """F(r_i) for each r_i of one prompt's rewards (see the module doc for ties)."""
    ordered = sorted(group)
    m = len(ordered)
    return [(bisect.bisect_left(ordered, r) + bisect.bisect_right(ordered, r)) / (2 * m)
            for r in group]


def bon_log_cdf(rewards: Sequence[float], groups: Sequence[Hashable]) -> list[float]:
    """log F_x(r) for every sample; `groups[i]` names sample i's prompt (e.g. its prompt_id)."""
    if len(rewards) != len(groups):
        raise ValueError(f"got {len(rewards)} rewards but {len(groups)} group labels")
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise ValueError(f"rewards must be finite, found {bad[:5]}")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        for i, f in zip(idx, empirical_cdf([rewards[i] for i in idx])):
            out[i] = math.log(f)
    return out
