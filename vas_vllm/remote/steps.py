"""One remote VAS step: from the server's top-k log-probabilities and the shifts of
`reweight.combine` to the next token, drawn from exactly the distribution the plugin samples.

In the engine the plugin turns the logits l into l[a] + delta[a] - rest for the top-k C and leaves
l[a] elsewhere; vLLM then divides by T. With pi_T = softmax(l / T) the sampled distribution is
    p(a) ∝ pi_T(a) * exp((delta[a] - rest) / T)     a in C
    p(a) ∝ pi_T(a)                                  a not in C  (the "rest": mass 1 - pi_T(C))
(rest -inf under vas_mask_outside_top_k). Greedy rows (T = 0) take the argmax of the processed
logits, which may be the best token outside C under an exact rule: that token is the (k+1)-th
of the server's list.

What the server returns decides what is known: log pi_T(a) for a in C when its log-probabilities
are pi_T's (vLLM's default `raw_logprobs` at T = 1: log_softmax(l), before temperature;
`--logprobs-mode processed_logprobs` at any T). Then the (K + 1)-way table over C and the rest
is known (`step_table`) and a draw that lands in the rest takes a token from the server's own
pi_T restricted to the rest (`pick_rest`). With raw log-probabilities at another T only ratios
inside C are known (pi_T(a) ∝ exp(log pi_1(a) / T)), not the rest's mass; the mean rule (rest
shift 0) is then sampled exactly by the two-coin Bernoulli factory (`two_coin`), whose coins are
server draws from pi_T.

Shape key: B rows, K candidates (columns), K + 1 with the rest (last column).
"""
from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Collection

import numpy as np
import torch

from vas_vllm.tilts import log1mexp

NEG_INF = float("-inf")
LOGPROB_FLOOR = -9999.0  # vLLM and OpenAI send -inf log-probabilities as -9999.0


def valid_candidates(lp: torch.Tensor) -> torch.Tensor:
    """Candidates that take part: finite log-probability (not the -9999 stand-in for -inf)."""
    return lp > LOGPROB_FLOOR                                                    # [B, K]


def rest_log_mass(lp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ_C pi(a)) in float64 from the candidates' log pi [B, K]; -inf where the server's
    rounded numbers leave nothing (Σ >= 1)."""
    log_c = torch.logsumexp(torch.where(valid, lp.double(), NEG_INF), dim=-1)    # [B]
    return torch.where(log_c < 0, log1mexp(log_c.clamp(max=-1e-300)), NEG_INF)  # [B]


def step_table(lp: torch.Tensor, valid: torch.Tensor, delta: torch.Tensor, rest: torch.Tensor,
               scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p over the K candidates and the rest (last column), normalised, float64: [B, K + 1].

    lp [B, K]: log pi_T(a) of the candidates; delta [B, K], rest [B]: reweight.combine's shifts;
    scale [B]: T (1 for greedy rows); mask [B]: vas_mask_outside_top_k."""
    cand = lp.double() + (delta.double() - rest.double()[:, None]) / scale.double()[:, None]
    cand = torch.where(valid, cand, NEG_INF)                                     # [B, K]
    rest_col = torch.where(mask, NEG_INF, rest_log_mass(lp, valid))              # [B]
    table = torch.cat((cand, rest_col[:, None]), dim=1)                         # [B, K + 1]
    return table - torch.logsumexp(table, dim=1, keepdim=True)


def greedy_choice(lp: torch.Tensor, valid: torch.Tensor, delta: torch.Tensor, rest: torch.Tensor,
                  next_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Column of the argmax of the processed logits: 0..K-1 a candidate, K the best token
    outside C, whose log-probability next_lp [B] is the (k+1)-th of the server's list (-inf
    when unknown). [B] long."""
    cand = torch.where(valid, lp.double() + delta.double() - rest.double()[:, None], NEG_INF)  # [B, K]
    best = cand.argmax(dim=1)                                                    # [B]
    outside = torch.where(mask, NEG_INF, next_lp.double())                       # [B]
    wins = outside > cand.gather(1, best[:, None])[:, 0]
    return torch.where(wins, cand.shape[1], best)


def sample_column(log_p: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from a normalised log-probability row, u in [0, 1)."""
    cdf = np.cumsum(np.exp(log_p - log_p.max()))
    cdf /= cdf[-1]          # ends at 1 exactly, so u < 1 never runs past a column of mass > 0
    return int(np.searchsorted(cdf, u, side="right"))


Draw = Callable[[int], Awaitable[int]]  # attempt number -> a token sampled by the server


async def pick_rest(first: int | None, cand: Collection[int], draw_outside: Draw,
                    max_draws: int) -> tuple[int, int]:
    """A token from pi_T restricted to the rest, and the server draws it took.

    `first` (or None) is a server sample of pi_T independent of our coins (the step request's
    own sample): if it lies outside C it is such a token. Otherwise `draw_outside` asks for a
    draw with logit_bias -100 on C; -100 is not -inf, so a candidate can still come back (with
    probability about e^(-100/T) pi_T(C) / pi_T(rest)): it is drawn again. Either way the token
    returned is distributed as pi_T(. | rest), exactly."""
    if first is not None and first not in cand:
        return first, 0
    for attempt in range(1, max_draws + 1):
        token = await draw_outside(attempt)
        if token not in cand:
            return token, attempt
    raise RuntimeError(
        f"{max_draws} draws with logit_bias -100 on the top-k all came back inside the top-k: the "
        "rest of the vocabulary holds almost no mass at this temperature; lower the temperature "
        "or raise vas_top_k")


async def two_coin(rng: np.random.Generator, log_pi: np.ndarray, shift: np.ndarray, cand: list[int],
                   first: int | None, draw: Draw, max_draws: int) -> tuple[int, int]:
    """Exact draw from p(a) ∝ pi_T(a) g(a) with g = exp(shift) on C and 1 elsewhere, knowing
    pi_T on C only up to a constant (log_pi [K], -inf for invalid candidates).

    With m = pi_T(C), q = pi_T / m on C and G = Σ_C q g, p(C) = m G / (m G + (1 - m)): the
    two-coin algorithm (Gonçalves, Łatuszyński, Roberts 2017) with c1 = G, c2 = 1. Each round
    flips one coin with a server draw x ~ pi_T: with probability G / (G + 1) the coin "C", heads
    if x is in C (answer: a in C drawn from q g), else the coin "rest", heads if x is not in C
    (answer: x itself, which is then distributed as pi_T(. | rest)). Expected draws
    (G + 1) / (m G + 1 - m). `first` (or None) is a server sample already at hand (the step
    request's own). Returns (token, server draws taken)."""
    log_qg = log_pi + shift                                                      # [K]
    log_g = float(np.logaddexp.reduce(log_qg) - np.logaddexp.reduce(log_pi))    # log G
    p_coin_c = 1.0 / (1.0 + math.exp(-log_g)) if log_g > -700 else 0.0           # G / (G + 1)
    members = set(cand)
    x, used = first, 0
    while True:
        if x is None:
            if used == max_draws:
                raise RuntimeError(
                    f"the two-coin sampler needed more than {max_draws} server draws for one token "
                    f"(G = {math.exp(log_g):.3g}); use temperature 1 or a server started with "
                    "--logprobs-mode processed_logprobs, where no extra draw is needed")
            used += 1
            x = await draw(used)
        if rng.random() < p_coin_c:
            if x in members:
                row = log_qg - np.logaddexp.reduce(log_qg)
                return cand[sample_column(row, rng.random())], used
        elif x not in members:
            return x, used
        x = None
