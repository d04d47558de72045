"""Is a distributional value model calibrated? Scores of predicted reward distributions.

For predictions p [N, O] over ascending reward bins r [O] and the observed rewards y [N]:
- CRPS, the continuous ranked probability score, E|X - y| - E|X - X'| / 2 for X, X' ~ p
  independent (lower is better; in reward units; 0 only for a point mass at y);
- the PIT histogram: where y falls in the predicted CDF. y is projected onto the bins like the
  training target (two-hot: bin j with weight 1 - a, bin j + 1 with weight a), and the PIT of bin
  b is uniform on [C_{b-1}, C_b] (randomised PIT for discrete forecasts). A calibrated model has a
  flat histogram; the expected histogram is computed exactly, without sampling. Reported: the
  10 bar heights (1.0 = flat) and their largest deviation from 1;
- the Pearson correlation of the predicted mean Σ_b p_b r_b with y;
- Best-of-N checks (bon_check) at the prompt: under the model's own distribution,
  N E[F_x(R)^(N-1)] with the mid-rank CDF (the bin's own mass counted by half) should be about 1
  (it is exactly 1 for the bin-averaged weight the plugin uses); and with R the held-out samples'
  rewards (F_x the predicted CDF, randomised within a bin like the PIT), N E[F_x(R)^(N-1)] is 1
  for a calibrated model: above 1, the model puts the real rewards too high in its CDF.

Shape key: N samples, O bins, H PIT histogram bars.
"""
from __future__ import annotations

from typing import Any

import torch

from value_models.training.td import two_hot

PIT_BARS = 10


def crps(p: torch.Tensor, bins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CRPS of each prediction: p [N, O] (probabilities), bins [O], y [N] -> [N] (float64)."""
    p, r, y = p.double(), bins.double(), y.double()
    spread = (r[:, None] - r[None, :]).abs()                                   # [O, O]
    to_y = (r[None, :] - y[:, None]).abs()                                     # [N, O]
    return (p * to_y).sum(-1) - 0.5 * torch.einsum("nb,bc,nc->n", p, spread, p)


def pit_histogram(p: torch.Tensor, bins: torch.Tensor, y: torch.Tensor, bars: int = PIT_BARS) -> torch.Tensor:
    """Expected randomised-PIT histogram [H], normalised so a calibrated model gives all ones."""
    p = p.double()
    c = torch.cumsum(p, -1)                                                    # [N, O]
    c = c / c[:, -1:]
    lo = torch.cat((torch.zeros_like(c[:, :1]), c[:, :-1]), -1)                # [N, O]: C_{b-1}
    target = two_hot(y, bins).double()                                         # [N, O]
    edges = torch.linspace(0, 1, bars + 1, dtype=torch.float64)                # [H + 1]
    # mass of U[lo_b, c_b] inside [e_h, e_{h+1}]: overlap / width (a point mass where width = 0)
    a = torch.maximum(lo[..., None], edges[:-1])                               # [N, O, H]
    b = torch.minimum(c[..., None], edges[1:])
    width = (c - lo)[..., None]
    inside = torch.where(width > 1e-12, (b - a).clamp(min=0) / width.clamp(min=1e-12),
                         ((lo[..., None] >= edges[:-1]) & (lo[..., None] < edges[1:])).double())
    hist = (target[..., None] * inside).sum((0, 1))                            # [H]
    return hist / hist.sum() * bars


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors in float64 (nan when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def calibration(logp: torch.Tensor, bins: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """CRPS, PIT histogram and mean correlation of predictions logp [N, O] (log-probabilities)."""
    p = logp.double().exp()
    hist = pit_histogram(p, bins, y)
    mean = (p * bins.double()).sum(-1)
    return {"crps": float(crps(p, bins, y).mean()), "pit": [round(float(h), 3) for h in hist],
            "pit_max_dev": float((hist - 1).abs().max()), "pearson_mean": pearson(mean, y.double()),
            "n": int(len(y))}


def bon_check(logp: torch.Tensor, bins: torch.Tensor, y: torch.Tensor,
              ns: tuple[int, ...] = (4, 16, 64)) -> dict[str, dict[str, float]]:
    """The module doc's two Best-of-N checks at the prompt: logp [N, O] predicted at each
    sample's prompt, y [N] its reward. Returns {N: {"self": ..., "data": ...}} (1.0 is right)."""
    p = logp.double().exp()
    c = torch.cumsum(p, -1)
    c = c / c[:, -1:]
    lo = torch.cat((torch.zeros_like(c[:, :1]), c[:, :-1]), -1)               # [N, O]
    mid = lo + p / 2                                                           # mid-rank F
    target = two_hot(y, bins).double()                                         # [N, O]
    out = {}
    for n in ns:
        self_ = n * (p * mid ** (n - 1)).sum(-1)                                # [N]
        # E[U^(n-1)] for U ~ Uniform[lo, c]: (c^n - lo^n) / (n (c - lo)), and its p -> 0 limit
        width = c - lo
        avg = torch.where(width > 1e-12, (c ** n - lo ** n) / (n * width.clamp(min=1e-12)), c ** (n - 1))
        data = n * (target * avg).sum(-1)                                      # [N]
        out[str(n)] = {"self": float(self_.mean()), "data": float(data.mean())}
    return out
