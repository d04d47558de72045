"""The reward of every prefix of every sample: dense targets for the trainer's auxiliary head.

For a sample (prompt x, response y_1..y_T) the value model's states are x + y_1..y_t, t = 0..T-1
(td.py). This module scores the text of each of those states with the dataset's reward,
r(x + decode(y_1..y_t)), so the trainer can teach a training-only head what the reward reads in
a text at every position (trainer.py, `aux_prefix_weight`). It is not a value target: the value
of a prefix is E[R | prefix] under pi_ref, not the reward of the text so far.

Cost: T reward calls per sample (cheap for lexicon rewards, T times the scoring for a reward
model). Cached beside the samples in `prefix_scores.<reward>.jsonl` (one line per sample: ids,
the key of its text, the T scores), appended and fsynced per batch, so a rerun is free and an
interrupted one resumes.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from value_models.training.rewards import parse_reward, sample_key, scores_path
from value_models.training.sampling import drop_partial_line, resolve_generator

logger = logging.getLogger(__name__)


def prefix_scores_path(data_dir: str | Path, reward: str) -> Path:
    path = scores_path(data_dir, reward)
    return path.with_name("prefix_" + path.name)


def _read(path: Path) -> dict[tuple[int, int], tuple[str, list[float]]]:
    cache: dict[tuple[int, int], tuple[str, list[float]]] = {}
    if path.exists():
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                    cache[(int(rec["prompt_id"]), int(rec["sample"]))] = (rec["key"], list(rec["scores"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a truncated last line: that sample is scored again
    return cache


def prefix_texts(tokenizer: Any, response_ids: Sequence[int]) -> list[str]:
    """decode(y_1..y_t) for t = 0..T-1 (t = 0: the empty response)."""
    return [tokenizer.decode(list(response_ids[:t]), skip_special_tokens=False)
            for t in range(len(response_ids))]


def load_prefix_scores(data_dir: str | Path, reward: str, samples: Sequence[dict[str, Any]],
                       generator: str, *, batch_texts: int = 4096) -> list[list[float]]:
    """Each sample's T prefix rewards (in order), computing and caching what is missing."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    path = prefix_scores_path(data_dir, reward)
    cache = _read(path)
    key = {id(s): sample_key(s["prompt"], s["response"]) for s in samples}
    todo = [s for s in samples if cache.get((s["prompt_id"], s["sample"]), ("",))[0] != key[id(s)]]
    if todo:
        logger.info("%s: scoring the prefixes of %d samples", path, len(todo))
        tokenizer = AutoTokenizer.from_pretrained(resolve_generator(generator))
        rw = parse_reward(reward)
        drop_partial_line(path)
        with open(path, "a", encoding="utf-8") as fh, \
                tqdm(total=len(todo), unit="sample", desc=f"prefix scores {reward}",
                     dynamic_ncols=True) as bar:
            i = 0
            while i < len(todo):
                batch, n = [], 0
                while i < len(todo) and (not batch or n + len(todo[i]["response_token_ids"]) <= batch_texts):
                    batch.append(todo[i])
                    n += len(todo[i]["response_token_ids"])
                    i += 1
                texts = [prefix_texts(tokenizer, s["response_token_ids"]) for s in batch]
                flat = rw.score([s["prompt"] for s, ts in zip(batch, texts) for _ in ts],
                                [t for ts in texts for t in ts])
                if len(flat) != n or not all(math.isfinite(x) for x in flat):
                    raise ValueError(f"reward {reward}: expected {n} finite prefix scores")
                at = 0
                for s, ts in zip(batch, texts):
                    scores = flat[at:at + len(ts)]
                    at += len(ts)
                    cache[(s["prompt_id"], s["sample"])] = (key[id(s)], scores)
                    fh.write(json.dumps({"prompt_id": s["prompt_id"], "sample": s["sample"],
                                         "key": key[id(s)], "scores": scores}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                bar.update(len(batch))
    return [cache[(s["prompt_id"], s["sample"])][1] for s in samples]
