"""`py:` rewards for tests/test_residual.py: deterministic functions of the text."""
from __future__ import annotations


def score(prompts: list[str], responses: list[str]) -> list[float]:
    """Differs between texts that differ in one token: a checksum of prompt + response in [0, 1)."""
    return [(sum(map(ord, p + r)) % 97) / 97.0 for p, r in zip(prompts, responses)]


def final_only(prompts: list[str], responses: list[str]) -> list[float]:
    return score(prompts, responses)


final_only.accepts_partial_text = False  # type: ignore[attr-defined]
