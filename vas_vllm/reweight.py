"""One step's shifts for a batch of rows, from the value models' outputs: the math of VASCore.apply
after the top-k and the value-model forwards, shared with any other caller (torch only).

For row b with candidates C_b (valid[b]) and value models m (knobs.models) the shift is
    delta[b, a] = Σ_m shift_bm(a)  for a in C_b,        rest[b] = Σ_m rest_bm  for a not in C_b
with, per model and rule (vas_vllm/tilts.py):
    mean rule         shift = strength * (Q(s∘a) - mean_C Q)           rest = 0
                      (strength beta * w_m, or (N - 1) * w_m for a bon_log_cdf model; Q is a
                      distributional model's mean)
    exact (tilt, bon, threshold; distributional models)
                      shift = e_m * T * (log h_m(s∘a) - log h_m(s))    rest by conservation
                      (vas_rest "keep": h_m(s) := Σ_C pi h_m / pi(C), rest shift 0)
                      (e_m = w_m, or 1 for the tilt, whose weight sits inside: beta * w_m)
Logits then become l[a] + delta[b, a] - rest[b] on the candidates (softmax is shift-invariant, so
adding rest[b] to every other token is the same).

Shape key: B rows, K candidates, O head outputs (bins).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vas_vllm import tilts
from vas_vllm.knobs import RequestKnobs


@dataclass
class ModelScores:
    """One value model's outputs for the rows that use it."""

    members: list[int]                   # row indices b (into the step's rows) that use the model
    out: torch.Tensor                    # [Bm, K] values (scalar head) or [Bm, K, O] bin logits
    bins: torch.Tensor | None = None     # [O] reward bins; None for a scalar head
    prefix_out: torch.Tensor | None = None   # [Bm, O] bin logits at each row's prefix s
    bon_log_w: torch.Tensor | None = None    # [Bm, O] Best-of-N log weights (bon rows; others any)


def rule_log_weights(knobs: Sequence[RequestKnobs], js: Sequence[int], bins: torch.Tensor,
                     bon_log_w: torch.Tensor | None) -> torch.Tensor:
    """log w_b [Bm, O] under each row's exact rule; js[i]: the model's index in knobs[i].models."""
    dev = bins.device

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).to(dev, non_blocking=True)  # [Bm]

    tilt = col([k.beta * k.weights[j] if k.mode == "tilt" else 0.0 for k, j in zip(knobs, js)])
    tau = col([k.taus[j] if k.mode == "threshold" else 0.0 for k, j in zip(knobs, js)])  # type: ignore[index]
    mode = col([{"tilt": 0, "threshold": 1, "bon": 2}[k.mode] for k in knobs])
    log_w = torch.where(mode[:, None] == 0, tilts.tilt_log_weights(bins, tilt),
                        tilts.threshold_log_weights(bins, tau))               # [Bm, O]
    if any(k.mode == "bon" for k in knobs):
        if bon_log_w is None:
            raise ValueError("rows under vas_bon_n need their Best-of-N weights (bon_log_w)")
        log_w = torch.where(mode[:, None] == 2, bon_log_w, log_w)
    return log_w


def combine(
    knobs: Sequence[RequestKnobs], valid: torch.Tensor, scores: dict[str, ModelScores],
    cand_logpi: torch.Tensor | None = None, scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifts of a step: (delta [B, K], rest [B], rest clamps [] int64) for rows with `knobs`.

    valid [B, K]: the candidates that take part in each row. cand_logpi [B, K]: log pi(a|s) at
    each row's sampling temperature, and scale [B]: that temperature (1 for greedy rows); both
    are needed only when a row uses an exact rule.
    """
    B, K = valid.shape
    dev = valid.device
    delta = torch.zeros((B, K), dtype=torch.float32, device=dev)
    rest = torch.zeros(B, dtype=torch.float32, device=dev)
    clamps = torch.zeros((), dtype=torch.int64, device=dev)
    for name, sc in scores.items():
        if not sc.members:
            continue
        mk = [knobs[i] for i in sc.members]
        js = [k.models.index(name) for k in mk]
        exact = [k.exact[j] for k, j in zip(mk, js)]
        m_t = torch.tensor(sc.members, dtype=torch.long).to(dev, non_blocking=True)  # [Bm]
        v = valid[m_t]                                                            # [Bm, K]
        if sc.bins is None:
            q = sc.out                                                            # [Bm, K]
        else:
            logp = tilts.bin_log_probs(sc.out)                                    # [Bm, K, O]
            q = tilts.mean_value(logp, sc.bins)                                   # [Bm, K]
        strength = torch.tensor([0.0 if e else k.beta * k.weights[j]
                                 for k, j, e in zip(mk, js, exact)], dtype=torch.float32)
        shift = tilts.mean_rule(q, v, strength.to(dev, non_blocking=True))        # [Bm, K]
        if any(exact):
            assert sc.bins is not None and sc.prefix_out is not None
            assert cand_logpi is not None and scale is not None
            ex = [i for i, e in enumerate(exact) if e]
            ex_t = torch.tensor(ex, dtype=torch.long).to(dev, non_blocking=True)  # [Be]
            rows_t = m_t[ex_t]                                                    # [Be]
            bon = sc.bon_log_w[ex_t] if sc.bon_log_w is not None else None
            log_w = rule_log_weights([mk[i] for i in ex], [js[i] for i in ex], sc.bins, bon)  # [Be, O]
            lh = tilts.log_h(logp[ex_t], log_w[:, None, :])                       # [Be, K]
            prefix_lh = tilts.log_h(tilts.bin_log_probs(sc.prefix_out[ex_t]), log_w)  # [Be]
            keep = torch.tensor([mk[i].rest_keep for i in ex]).to(dev, non_blocking=True)  # [Be]
            cand, r, clamped = tilts.exact_shifts(
                cand_logpi[rows_t], v[ex_t], lh, prefix_lh, log_w.amax(-1), keep)
            power = torch.tensor([1.0 if mk[i].mode == "tilt" else mk[i].weights[js[i]] for i in ex],
                                 dtype=torch.float32).to(dev, non_blocking=True) * scale[rows_t]  # [Be]
            shift[ex_t] = power[:, None] * cand
            rest.index_add_(0, rows_t, power * r)
            clamps = clamps + clamped.sum()
        delta.index_add_(0, m_t, shift)
    return torch.where(valid, delta, 0.0), rest, clamps
