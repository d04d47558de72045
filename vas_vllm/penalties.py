"""vLLM's repetition, frequency and presence penalties, forward and inverse (for the V1 adapter).

What VAS re-weights, on both runners: the generator's distribution after everything the request
asked vLLM to do to it before sampling, i.e. after allowed ids, bad words, min_tokens,
logit_bias and the penalties (then vLLM applies temperature, min_p, top-k/top-p). That is Model
Runner V2's order (v1/worker/gpu/sample/sampler.py: bias, penalties, bad words, then custom
processors). vLLM's V1 runner (v1/sample/sampler.py) runs custom processors before the
penalties, so the V1 adapter penalises its rows' logits itself, lets VAS shift them, and hands
vLLM logits that vLLM's own penalties turn into exactly the shifted ones:

    l' = P^-1(P(l) + delta)   so that   P(l') = P(l) + delta

with, per token a of a row with repetition r, frequency f, presence p, and c_a the count of a
in the output (vllm.model_executor.layers.utils.apply_penalties):

    P(x) = rep(x) - f * c_a - p * [c_a > 0],   rep(x) = x / r if x > 0 else x * r
           (rep only for tokens in the prompt or the output).

P is strictly increasing for r > 0, so P^-1(z) = rep^-1(z + f * c_a + p * [c_a > 0]) with
rep^-1(y) = y * r if y > 0 else y / r. Tokens VAS did not shift keep their original logit, so
rows and tokens VAS does not touch reach vLLM bit for bit as before.

Shape key: P rows with penalties, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Penalties:
    repetition: float
    frequency: float
    presence: float

    @classmethod
    def of(cls, params: Any) -> Penalties | None:
        """The request's penalties, or None when it has none (vLLM's no-op values)."""
        pen = cls(float(getattr(params, "repetition_penalty", 1.0)),
                  float(getattr(params, "frequency_penalty", 0.0)),
                  float(getattr(params, "presence_penalty", 0.0)))
        return None if (pen.repetition, pen.frequency, pen.presence) == (1.0, 0.0, 0.0) else pen


@dataclass
class PenaltyState:
    """What P needs for a batch of rows: per-row factors [P, 1] and token statistics [P, V]."""

    repetition: torch.Tensor   # [P, 1]
    frequency: torch.Tensor    # [P, 1]
    presence: torch.Tensor     # [P, 1]
    seen: torch.Tensor         # [P, V] bool: in the prompt or the output
    counts: torch.Tensor       # [P, V] output counts (int64, as vLLM's)

    @classmethod
    def build(cls, penalties: Sequence[Penalties], prompts: Sequence[Sequence[int]],
              outputs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> PenaltyState:
        def padded(lists: Sequence[Sequence[int]]) -> torch.Tensor:  # [P, n], pad (and -1) -> vocab
            n = max((len(x) for x in lists), default=0)
            t = torch.full((len(lists), max(n, 1)), vocab, dtype=torch.long)
            for i, x in enumerate(lists):
                if x:
                    t[i, :len(x)] = torch.as_tensor(list(x), dtype=torch.long)
            return t.masked_fill_(t < 0, vocab).to(device, non_blocking=True)

        def bincount(tokens: torch.Tensor) -> torch.Tensor:  # [P, n] -> [P, V]
            counts = torch.zeros((tokens.shape[0], vocab + 1), dtype=torch.long, device=device)
            return counts.scatter_add_(1, tokens, torch.ones_like(tokens))[:, :vocab]

        counts = bincount(padded(outputs))
        column = lambda xs: torch.tensor(xs, dtype=torch.float32).to(device)[:, None]  # noqa: E731
        return cls(repetition=column([p.repetition for p in penalties]),
                   frequency=column([p.frequency for p in penalties]),
                   presence=column([p.presence for p in penalties]),
                   seen=(bincount(padded(prompts)) > 0) | (counts > 0), counts=counts)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """P(logits) for logits [P, V] float32, the same operations as vLLM's (a new tensor)."""
        r = torch.where(self.seen, self.repetition, 1.0)                      # [P, V]
        out = logits * torch.where(logits > 0, 1.0 / r, r)
        out -= self.frequency * self.counts
        out -= self.presence * (self.counts > 0)
        return out

    def invert(self, shifted: torch.Tensor) -> torch.Tensor:
        """P^-1(shifted) [P, V]: what to hand vLLM so that its penalties give `shifted`."""
        y = shifted + self.frequency * self.counts + self.presence * (self.counts > 0)
        r = torch.where(self.seen, self.repetition, 1.0)                      # [P, V]
        return y / torch.where(y > 0, 1.0 / r, r)
