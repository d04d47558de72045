"""The reward term of residual value models: V(s) = r(s) + U(s) (vas.json value_parametrization
"residual"; README, "Residual value models").

The head predicts U; r is the model's own reward (vas.json `reward`) applied to the text of the
state, prompt + response so far, exactly as training computed it (value_models/training/
prefix_rewards.py: the prompt's text plus decode(response ids), special tokens kept), and in the
model's units: standardised with vas.json `reward_normalization` when the model was trained
standardised. Every user of V adds it: the plugin's rules (core.py, for each candidate s∘a), the
search's scorer and the benchmarks. A reward that cannot score a partial text (a `py:` function
with `accepts_partial_text = False`) is refused when the model is loaded.

Cost: one reward call per candidate text per step (k per row); cheap for the lexicon rewards,
a forward per text for an `hf:` reward model.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class ResidualReward:
    def __init__(self, name: str, metadata: Any, tokenizer: Any) -> None:
        from value_models.reward_specs import parse_reward

        self.name, self.tokenizer = name, tokenizer
        self.reward = parse_reward(metadata.reward)
        fn = getattr(self.reward, "fn", None)
        if not getattr(self.reward, "accepts_partial_text", getattr(fn, "accepts_partial_text", True)):
            raise ValueError(f"value model {name!r} is residual (V = r + U) on the reward "
                             f"{metadata.reward!r}, which cannot score a partial text "
                             "(accepts_partial_text = False)")
        norm = metadata.reward_normalization or {}
        self.mean, self.std = float(norm.get("mean", 0.0)), float(norm.get("std", 1.0))
        self.bos = getattr(tokenizer, "bos_token_id", None)

    def prompt_text(self, prompt_ids: Sequence[int]) -> str:
        """The prompt's text as the sampler stored it: a leading BOS the tokenizer adds is not part
        of it (other special tokens, e.g. a chat template's, are)."""
        ids = list(prompt_ids)
        if ids and self.bos is not None and ids[0] == self.bos:
            ids = ids[1:]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def raw(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> list[float]:
        """r(prompt + decode(response)) for each pair, in reward units."""
        texts = self.tokenizer.batch_decode([list(r) for r in responses], skip_special_tokens=False)
        return [float(x) for x in self.reward.score(list(prompts), texts)]

    def standardised(self, values: Sequence[float]) -> list[float]:
        return [(v - self.mean) / self.std for v in values]

    def offsets(self, histories: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                cand: torch.Tensor) -> torch.Tensor:
        """r of history ∘ a for every candidate a, in the model's units: cand [B, K] -> [B, K]."""
        B, K = cand.shape
        ids = cand.tolist()
        prompts, responses = [], []
        for h, n, row in zip(histories, prompt_lens, ids):
            text = self.prompt_text(h[:n])
            out = list(h[n:])
            for a in row:
                prompts.append(text)
                responses.append(out + [a])
        r = self.standardised(self.raw(prompts, responses))
        return torch.tensor(r, dtype=torch.float32).view(B, K)
