"""Hand-made dataset folders (the layout `vas-vllm sample` writes) for tests that need no vLLM."""
from __future__ import annotations

import json
import random
from pathlib import Path

GOOD_TOKEN = 1000  # a response containing this token is "good"


def good_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A py: reward for the fake datasets: +1 for a good response, -1 otherwise."""
    return [1.0 if "good" in r else -1.0 for r in responses]


def write_fake_dataset(out: Path, *, num_prompts: int = 24, num_samples: int = 4, seed: int = 0,
                       generator: str = "fake-generator") -> Path:
    """Random token sequences; half of the responses contain GOOD_TOKEN (text says 'good')."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": 1, "generator": generator, "prompts": "fake", "num_prompts": num_prompts,
            "prompts_sha256": "0", "sampling": {"num_samples": num_samples}}
    (out / "dataset.json").write_text(json.dumps(meta))
    with open(out / "samples.jsonl", "w") as fh:
        for pid in range(num_prompts):
            prompt_ids = [rng.randrange(2000, 40000) for _ in range(rng.randint(1, 6))]
            for j in range(num_samples):
                resp = [rng.randrange(2000, 40000) for _ in range(rng.randint(1, 12))]
                good = rng.random() < 0.5
                if good:
                    resp[rng.randrange(len(resp))] = GOOD_TOKEN
                fh.write(json.dumps({
                    "prompt_id": pid, "prompt": f"prompt {pid}", "sample": j,
                    "response": f" {'good' if good else 'bad'} {pid}.{j}",
                    "prompt_token_ids": prompt_ids, "response_token_ids": resp,
                    "finish_reason": "length"}) + "\n")
    return out


def graded_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A py: reward with spread: +-1 for good / bad plus a deterministic offset in [0, 0.5)."""
    return [(1.0 if "good" in r else -1.0) + (sum(map(ord, r)) % 50) / 100 for r in responses]
