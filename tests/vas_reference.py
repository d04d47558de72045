"""The slow, obviously-correct VAS reference: full, uncached transformers forwards in fp32.

For a history s (prompt ++ output so far) it computes the generator's logits l, takes the top-k
C, scores every a in C with a full forward of each value model on s ∘ a, and returns
    l'[a] = l[a] + beta * sum_m w_m * (Q_m[a] - mean_C Q_m)   (a in C),   l'[a] = l[a] otherwise
(or -inf outside C when masking). Tests compare vLLM's tokens / processed logprobs with it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from value_reference import reference_values


class VASReference:
    def __init__(self, generator: Path, value_models: dict[str, Path]) -> None:
        self.gen = AutoModelForCausalLM.from_pretrained(generator, dtype=torch.float32).eval()
        self.values = {
            name: LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in value_models.items()
        }

    @torch.no_grad()
    def logits(self, history: Sequence[int]) -> torch.Tensor:
        return self.gen(input_ids=torch.tensor([list(history)])).logits[0, -1].float()  # [V]

    def processed(self, history: Sequence[int], **knobs) -> torch.Tensor:
        return self.reweight(self.logits(history), history, **knobs)

    @torch.no_grad()
    def reweight(
        self, l: torch.Tensor, history: Sequence[int], *, beta: float, top_k: int,
        models: Sequence[str], weights: Sequence[float] | None = None, mask: bool = False,
    ) -> torch.Tensor:
        """The processed logits for generator logits l [V] at this history."""
        cand = l.topk(top_k).indices
        out = l.clone()
        for name, w in zip(models, weights or [1.0] * len(models)):
            q = reference_values(self.values[name], list(history), cand.tolist())   # [K]
            out[cand] += beta * w * (q - q.mean())
        if mask:
            keep = out[cand].clone()
            out.fill_(float("-inf"))
            out[cand] = keep
        return out

    @torch.no_grad()
    def processed_steps(
        self, prompt: list[int], tokens: list[int], *, beta: float, top_k: int,
        models: Sequence[str], weights: Sequence[float] | None = None, mask: bool = False,
    ) -> torch.Tensor:
        """Processed logits before each of `tokens`: [T, V]. Same maths as `reweight`, batched:
        one causal forward gives the generator's logits at every step, and every s_t ∘ a is a
        full forward of its own row (right-padded, so the padding is never attended)."""
        T = len(tokens)
        ids = torch.tensor([prompt + tokens])
        l = self.gen(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + T].float()  # [T, V]
        cand = l.topk(top_k, dim=-1).indices                                                # [T, K]
        out = l.clone()
        n = torch.arange(T) + len(prompt)                      # len(s_t): position of the candidate
        rows = torch.zeros((T, top_k, int(n.max()) + 1), dtype=torch.long)                 # [T, K, N]
        full = ids[0]
        for t in range(T):
            rows[t, :, :n[t]] = full[:n[t]]
            rows[t, :, n[t]] = cand[t]
        rows = rows.view(T * top_k, -1)
        at = n.repeat_interleave(top_k)                                                     # [T*K]
        for name, w in zip(models, weights or [1.0] * len(models)):
            model = self.values[name]
            q = torch.cat([
                model.score(model.model(input_ids=rows[i:i + 256]).last_hidden_state[
                    torch.arange(len(rows[i:i + 256])), at[i:i + 256]]).squeeze(-1)
                for i in range(0, len(rows), 256)]).float().view(T, top_k)                  # [T, K]
            out.scatter_add_(1, cand, beta * w * (q - q.mean(-1, keepdim=True)))
        if mask:
            keep = out.gather(1, cand)
            out = torch.full_like(out, float("-inf")).scatter_(1, cand, keep)
        return out

    def check_greedy(self, prompt: list[int], tokens: list[int], *, tol: float = 1e-4, **knobs) -> int:
        """Assert every token is the argmax of the processed logits; returns the count of
        near-ties (gap < tol, where fp rounding between two engines may pick either)."""
        ties = 0
        scores = self.processed_steps(prompt, tokens, **knobs)
        for t, tok in enumerate(tokens):
            s = scores[t]
            best = int(s.argmax())
            if tok != best:
                gap = float(s[best] - s[tok])
                assert gap < tol, (
                    f"step {t}: vLLM chose {tok} (score {float(s[tok]):.6f}) but the reference "
                    f"argmax is {best} (score {float(s[best]):.6f}); knobs {knobs}")
                ties += 1
        return ties

    def check_logprobs(
        self, prompt: list[int], tokens: list[int], logprobs: list[float], *, atol: float = 2e-4,
        **knobs,
    ) -> None:
        """Assert vLLM's processed logprob of each sampled token equals log_softmax(l')."""
        ref = torch.log_softmax(self.processed_steps(prompt, tokens, **knobs), -1)
        for t, (tok, lp) in enumerate(zip(tokens, logprobs)):
            assert abs(float(ref[t, tok]) - lp) < atol, (
                f"step {t}: token {tok} has processed logprob {lp:.6f} in vLLM, reference "
                f"{float(ref[t, tok]):.6f}; knobs {knobs}")
