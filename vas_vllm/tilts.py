"""The re-weighting rules: the paper's mean rule and the exact tilts (exact-tilts.md). Torch only.

Mean rule (the paper; scalar or distributional models): for the top-k candidates C of a row,
    l'[a] = l[a] + strength * (q_a - mean_{a' in C} q_a')      a in C;   other tokens unchanged
with q_a the value V(s∘a) (a distributional model's mean, Σ_b p_b r_b).

Exact tilts (distributional models). Such a model predicts at a prefix s the distribution of the
terminal reward R under pi_ref continuing s: probabilities p_b(s) over B fixed reward values r_b
(vas.json `bins`). A target p*(y) ∝ pi_ref(y) w(r(y)) with a weight w >= 0 has
h(s) = E[w(R) | s] = Σ_b p_b(s) w_b, and token by token, exactly,
    p*(a | s) = pi_ref(a | s) h(s∘a) / h(s),   i.e.   l'[a] = l[a] + log h(s∘a) - log h(s).
The targets, as log w_b:
    tilt(beta)      beta r_b                        the KL-regularised optimum of E[r] - KL / beta
    bon(N)          log((C_b^N - C_{b-1}^N) / p_b(x))   Best-of-N; C the CDF of p(x), the
                                                    distribution the model predicts at the prompt
    threshold(tau)  0 if r_b >= tau, else -inf      P(R >= tau)
Best-of-N's weight for a continuous reward is N F_x(r)^(N-1); averaged over a bin across which the
CDF rises from C_{b-1} to C_b it is (C_b^N - C_{b-1}^N) / p_b. For a reward that takes only the
bin values, with ties broken at random, that is Best-of-N's weight exactly. Σ_b p_b(x) w_b = 1, so
h = 1 at the prompt (E[F_x(R)^(N-1)] = 1/N).

Only the candidates C get their own h(s∘a). Every other token ("rest") gets h_rest from
conservation, Σ_{a∉C} pi(a|s) h(s∘a) = h(s) - Σ_{a∈C} pi(a|s) h(s∘a), which keeps the mass of C
against the rest exact; inside the rest the split stays pi_ref's. A noisy model can make the
difference negative: h_rest is then clamped to the smallest candidate h, and it is capped at the
largest weight max_b w_b (h can never exceed it); both count as clamps. Where the rest holds less
than REST_MIN of pi's mass (the top-k covers nearly everything), the difference is rounding
noise: the rest keeps h(s) (shift 0), which moves at most that mass. A row whose h(s) is 0 (only
an exactly-zero bin probability can do that) is left unchanged. Computed in float64.

pi is the distribution the row samples from: softmax(l / T). vLLM divides the processed logits
by T after the logits processors, so the shift to add is T * (log h(s∘a) - log h(s)); the rule is
exact when T is the temperature the value model's training samples were drawn at. Greedy rows
(T = 0) use T = 1: they pick the mode of the guided distribution at temperature 1.

Shape key: R rows, K candidates, O bins (head outputs).
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")
REST_MIN = 1e-6  # rest mass below which h_rest is not estimated (see the module doc)
CAP_SLACK = 1e-4  # log h_rest this far above the largest log weight is float32 rounding


def bin_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Head logits [..., O] -> log p_b [..., O] in float32."""
    return torch.log_softmax(logits.float(), dim=-1)


def mean_value(logp: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """E[R] = Σ_b p_b r_b: logp [..., O], bins [O] -> [...]."""
    return (logp.exp() * bins).sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for x -> -inf (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tilt_log_weights(bins: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log w_b = beta r_b: bins [O], beta [R] -> [R, O]."""
    return beta.float()[:, None] * bins.float()[None, :]


def threshold_log_weights(bins: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """log w_b = log 1[r_b >= tau]: bins [O], tau [R] -> [R, O] (0 or -inf)."""
    keep = bins.float()[None, :] >= tau.float()[:, None]                     # [R, O]
    return torch.where(keep, 0.0, NEG_INF)


def bon_log_weights(prompt_logp: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """log w_b = log((C_b^N - C_{b-1}^N) / p_b): prompt_logp [R, O] (log p(x)), n [R] -> [R, O].

    Computed in float64 in log space: N log C_b + log(1 - (C_{b-1}/C_b)^N) - log p_b. Where p_b is
    so small that the difference cancels, the limit N C_b^(N-1) is used.
    """
    lp = prompt_logp.double()
    n = n.double()[:, None]                                                   # [R, 1]
    log_c = torch.logcumsumexp(lp, dim=-1)                                    # [R, O]: log C_b
    log_c = log_c - log_c[:, -1:]                                             # C_O = 1 exactly
    log_prev = torch.cat((torch.full_like(log_c[:, :1], NEG_INF), log_c[:, :-1]), dim=-1)
    ratio = n * (log_prev - log_c)                                            # [R, O], <= 0
    exact = n * log_c + log1mexp(ratio.clamp(max=-1e-300)) - lp
    limit = torch.log(n) + (n - 1) * log_c
    # (1 - e^ratio) ~ -ratio when |ratio| is tiny: the exact form has lost its digits there.
    return torch.where(ratio > -1e-9, limit, exact).float()


def log_h(logp: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log Σ_b p_b w_b: logp [..., O] and log_w broadcastable to it -> [...]."""
    return torch.logsumexp(logp + log_w, dim=-1)


def mean_rule(q: torch.Tensor, valid: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """The paper's shift strength * (q - mean over the row's valid candidates), 0 elsewhere.

    q [R, K] values, valid [R, K], strength [R] -> [R, K].
    """
    count = valid.sum(-1, keepdim=True).clamp(min=1)                          # [R, 1]
    mean = torch.where(valid, q, 0.0).sum(-1, keepdim=True) / count           # [R, 1]
    return torch.where(valid, strength[:, None] * (q - mean), 0.0)


def exact_shifts(
    cand_logpi: torch.Tensor, valid: torch.Tensor, cand_log_h: torch.Tensor,
    prefix_log_h: torch.Tensor, log_w_max: torch.Tensor, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact shifts log h(s∘a) - log h(s) for the candidates, and the rest's by conservation.

    Rows with keep [R] True (`vas_rest` "keep") take h(s) to be the candidates' pi-weighted mean
    Σ_C pi h / pi(C) instead of the model's own value at s, and give the rest that same h: the
    top-k's total mass stays pi(C) and only its split follows h. Exact when the rest's tokens
    average the candidates' h; it never reads h(s), so a model whose value at s disagrees with
    its values one token later (not a martingale) moves no mass between the top-k and the rest.

    cand_logpi [R, K]: log pi(a|s) of the candidates under the row's sampling distribution
    (best computed in float64: the rest's mass is 1 minus theirs);
    valid [R, K]: candidates that take part (invalid ones get shift 0); cand_log_h [R, K]:
    log h(s∘a); prefix_log_h [R]: log h(s); log_w_max [R]: log of the largest weight.
    Returns (candidate shifts [R, K], rest shift [R], clamped [R] bool).
    """
    lpi = torch.where(valid, cand_logpi.double(), NEG_INF)                    # [R, K]
    lh = torch.where(valid, cand_log_h.double(), NEG_INF)                     # [R, K]
    prefix, log_w_max = prefix_log_h.double(), log_w_max.double()             # [R], [R]
    log_mass_c = torch.logsumexp(lpi, dim=-1)                                 # [R]: log pi(C)
    log_pi_rest = log1mexp(log_mass_c.clamp(max=-1e-300))                     # [R]: log pi(rest)
    has_rest = log_pi_rest > math.log(REST_MIN)
    log_sum_c = torch.logsumexp(lpi + lh, dim=-1)                            # [R]: log Σ_C pi h
    if keep is not None:  # h(s) := Σ_C pi h / pi(C): gap = log pi(C), h_rest = h(s), no clamp
        prefix = torch.where(keep, log_sum_c - log_mass_c, prefix)
    gap = log_sum_c - prefix                                                  # [R]: log(Σ_C pi h / h(s))
    positive = gap < 0                                                        # h(s) - Σ_C pi h > 0
    log_rest = prefix + log1mexp(gap.clamp(max=-1e-30)) - log_pi_rest         # [R]: log h_rest
    floor = torch.where(valid, lh, float("inf")).amin(-1)                     # [R]: min_C log h
    capped = log_rest > log_w_max + CAP_SLACK  # within the slack it is rounding: capped, not counted
    log_rest = torch.where(positive, torch.minimum(log_rest, log_w_max), floor)
    clamped = has_rest & (~positive | capped)
    if keep is not None:
        log_rest = torch.where(keep, prefix, log_rest)
        clamped = clamped & ~keep
    # h(s) = 0: the target cannot be reached from here (only with exact zeros); leave the row be
    alive = torch.isfinite(prefix)
    clamped = clamped & alive
    rest_shift = torch.where(has_rest & alive, log_rest - prefix, 0.0)        # [R]
    cand_shift = torch.where(valid & alive[:, None], lh - prefix[:, None], 0.0)  # [R, K]
    return cand_shift.float(), rest_shift.float(), clamped
