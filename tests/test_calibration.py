"""Calibration scores of distributional value models against direct computations."""
from __future__ import annotations

import torch

from value_models.training.calibration import bon_check, calibration, crps, pit_histogram


def crps_by_integration(p: list[float], bins: list[float], y: float, steps: int = 200_000) -> float:
    """∫ (F(x) - 1[x >= y])^2 dx on a fine grid (F the step CDF of the atoms)."""
    lo, hi = min(bins[0], y) - 1.0, max(bins[-1], y) + 1.0
    xs = torch.linspace(lo, hi, steps, dtype=torch.float64)
    F = sum(pb * (xs >= b).double() for pb, b in zip(p, bins))
    H = (xs >= y).double()
    return float(((F - H) ** 2).sum() * (hi - lo) / (steps - 1))


def test_crps_against_integration():
    g = torch.Generator().manual_seed(0)
    bins = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.0])
    p = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), -1)
    y = torch.tensor([-1.2, -0.3, 0.1, 0.4, 0.99, 2.0])
    got = crps(p, bins, y)
    for i in range(6):
        want = crps_by_integration(p[i].tolist(), bins.tolist(), float(y[i]))
        # a Riemann sum of a step function: each of its jumps (one per bin, one at y; of height
        # <= 1) and one end point cost at most one grid step h (float64 rounding: far below)
        lo, hi = min(float(bins[0]), float(y[i])) - 1.0, max(float(bins[-1]), float(y[i])) + 1.0
        tol = (len(bins) + 2) * (hi - lo) / (200_000 - 1)
        assert abs(float(got[i]) - want) < tol, (i, float(got[i]), want, tol)
    point = torch.zeros(1, 5, dtype=torch.float64)
    point[0, 3] = 1.0
    assert abs(float(crps(point, bins, torch.tensor([0.4])))) < 1e-12  # a point mass at y (float64)


def test_pit_is_flat_when_y_comes_from_the_prediction_and_not_otherwise():
    g = torch.Generator().manual_seed(1)
    bins = torch.linspace(-1, 1, 9)
    p = torch.softmax(torch.randn(4000, 9, generator=g) * 1.5, -1)
    y = bins[torch.multinomial(p, 1, generator=g)[:, 0]]                         # y ~ p
    hist = pit_histogram(p, bins, y)
    assert torch.allclose(hist.sum(), torch.tensor(10.0, dtype=torch.float64))  # float64 sum of 10 bins
    assert float((hist - 1).abs().max()) < 0.1, hist
    sharp = torch.softmax(torch.log(p) * 4, -1)                                  # overconfident
    assert float((pit_histogram(sharp, bins, y) - 1).abs().max()) > 0.3
    cal = calibration(torch.log(p), bins, y)
    assert cal["pit_max_dev"] < 0.1 and cal["pearson_mean"] > 0.3 and cal["n"] == 4000


def test_bon_check_is_one_for_calibrated_predictions_and_above_for_pessimistic_ones():
    g = torch.Generator().manual_seed(2)
    bins = torch.linspace(-1, 1, 33)
    p = torch.softmax(torch.randn(20000, 33, generator=g), -1)
    y = bins[torch.multinomial(p, 1, generator=g)[:, 0]]                         # y ~ p
    got = bon_check(torch.log(p), bins, y, ns=(4, 16))
    for n in ("4", "16"):
        assert abs(got[n]["self"] - 1) < 0.05, got        # mid-rank F: close to, not exactly, 1
        assert abs(got[n]["data"] - 1) < 0.1, got
    low = torch.softmax(torch.log(p) - 3 * bins.clamp(min=0), -1)               # predicts too low
    assert bon_check(torch.log(low), bins, y, ns=(16,))["16"]["data"] > 1.5
