"""Statistics of the quality benchmark (benchmarks/quality.py): numpy only, no engine.

Shapes: P prompts, M samples per prompt (Best-of-N draws M = Nmax once), T tokens of a sample.

- `mean_ci`: mean with a normal-approximation 95% interval over prompts.
- `bootstrap_ci`: the same mean with a percentile-bootstrap interval (a cross-check).
- `win_scores`: per prompt 1 / 0.5 / 0 for a win / tie / loss against the baseline.
- `sequence_kl`: per sample sum_t (log pi(y_t) - log pi_ref(y_t)); its mean over samples drawn
  from pi is an unbiased estimate of KL(pi || pi_ref).
- `bon_kl`: KL(pi_BoN || pi_ref) = log N - (N-1)/N (exact for continuous rewards, an upper
  bound otherwise; vBoN, Amini et al. 2025).
- `bon_weights` / `best_of_n`: E[f(best of N)] per prompt estimated from M >= N samples by
  averaging f(max) over ALL N-subsets of the M samples: with the rewards sorted ascending,
  subset maxima fall on the i-th smallest sample (1-based) with probability
  C(i-1, N-1) / C(M, N). This U-statistic is unbiased like "the first N samples" and has lower
  variance; with N = M it is f of the best sample.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def mean_ci(x: Sequence[float] | np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): mean +- z * sample std / sqrt(n) (normal approximation)."""
    a = np.asarray(x, dtype=np.float64)  # [P]
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence, found shape {a.shape}")
    m = float(a.mean())
    if a.size == 1:
        return m, m, m
    half = z * float(a.std(ddof=1)) / math.sqrt(a.size)
    return m, m - half, m + half


def bootstrap_ci(x: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over the entries of x (prompts)."""
    a = np.asarray(x, dtype=np.float64)  # [P]
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence, found shape {a.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))  # [n_boot, P]
    means = a[idx].mean(axis=1)  # [n_boot]
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(a.mean()), float(lo), float(hi)


def win_scores(method: Sequence[float] | np.ndarray,
               baseline: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per prompt: 1 if method > baseline, 0.5 on a tie, 0 otherwise (same prompt order)."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two 1-D arrays of one shape, found {a.shape} and {b.shape}")
    return (a > b) + 0.5 * (a == b)  # [P]


def sequence_kl(logprobs: Sequence[Sequence[float]],
                ref_logprobs: Sequence[Sequence[float]]) -> np.ndarray:
    """Per sample sum_t (logprobs[t] - ref_logprobs[t]); both lists hold the sampled tokens'
    log-probabilities, one list per sample, of equal lengths."""
    if len(logprobs) != len(ref_logprobs):
        raise ValueError(f"got {len(logprobs)} samples of logprobs but {len(ref_logprobs)} of "
                         "reference logprobs")
    out = np.empty(len(logprobs), dtype=np.float64)  # [S]
    for i, (lp, ref) in enumerate(zip(logprobs, ref_logprobs)):
        if len(lp) != len(ref):
            raise ValueError(f"sample {i}: {len(lp)} logprobs but {len(ref)} reference logprobs")
        out[i] = float(np.sum(np.asarray(lp, dtype=np.float64) - np.asarray(ref, dtype=np.float64)))
    return out


def bon_kl(n: int) -> float:
    """KL(Best-of-n || reference) in nats: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, found {n}")
    return math.log(n) - (n - 1) / n


def bon_weights(m: int, n: int) -> np.ndarray:
    """[M] probability that the maximum of a uniformly random n-subset of m items is the i-th
    smallest (0-based i): C(i, n-1) / C(m, n)."""
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m, found n={n}, m={m}")
    total = math.comb(m, n)
    return np.array([math.comb(i, n - 1) / total for i in range(m)], dtype=np.float64)


def best_of_n(rewards: np.ndarray, n: int, values: np.ndarray | None = None) -> np.ndarray:
    """[P] per prompt, the mean over all n-subsets of the prompt's M samples of `values` at the
    subset's highest-reward sample (values defaults to the rewards: the expected Best-of-n
    reward). rewards, values: [P, M]. Among samples tied in reward the pick is arbitrary, which is
    harmless when values is a function of the reward (the reward itself, a win indicator)."""
    r = np.asarray(rewards, dtype=np.float64)  # [P, M]
    if r.ndim != 2:
        raise ValueError(f"rewards must be [P, M], found shape {r.shape}")
    v = r if values is None else np.asarray(values, dtype=np.float64)  # [P, M]
    if v.shape != r.shape:
        raise ValueError(f"values must have the rewards' shape {r.shape}, found {v.shape}")
    order = np.argsort(r, axis=1, kind="stable")  # [P, M] ascending
    v_sorted = np.take_along_axis(v, order, axis=1)  # [P, M]
    return v_sorted @ bon_weights(r.shape[1], n)  # [P]
