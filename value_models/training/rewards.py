"""Training's reward side: score a dataset folder's samples, with a resumable cache.

The reward specs themselves (`parse_reward`, the built-ins, `hf:` and `py:`) are in
value_models/reward_specs.py, which the server also uses; they are re-exported here.
Scores are cached beside the samples in `scores.<reward>.jsonl`, one line per sample
(prompt_id, sample, key = hash of prompt and response, score), appended and fsynced per batch:
`score_dataset` computes only what is missing, so an interrupted run resumes and a re-run is free.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from value_models.reward_specs import (REWARDS, CallableReward, Reward, TextBlobPolarity, TextReward,
                                       VaderPositive, canonical_name, parse_reward, register_reward)
from value_models.training.sampling import drop_partial_line, load_samples

__all__ = ["REWARDS", "CallableReward", "Reward", "TextBlobPolarity", "TextReward", "VaderPositive",
           "canonical_name", "parse_reward", "register_reward", "scores_path", "sample_key",
           "score_dataset", "load_scores"]

logger = logging.getLogger(__name__)


# ---- score cache ---------------------------------------------------------------------------

def scores_path(data_dir: str | Path, reward: str) -> Path:
    """Where a dataset's scores for `reward` (a spec) are cached."""
    name = canonical_name(reward)
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)[:80]
    if slug != name:  # lossy: keep distinct specs in distinct files
        slug += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return Path(data_dir).expanduser() / f"scores.{slug}.jsonl"


def sample_key(prompt: str, response: str) -> str:
    """A short hash tying a cached score to the exact text it scored."""
    return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict[tuple[int, int], tuple[str, float]]:
    cache: dict[tuple[int, int], tuple[str, float]] = {}
    if path.exists():
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                    key = (int(rec["prompt_id"]), int(rec["sample"]))
                    cache[key] = (rec["key"], float(rec["score"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a truncated last line: that sample is scored again
    return cache


def score_dataset(data_dir: str | Path, reward: str | Reward, *, batch_size: int = 64) -> Path:
    """Score every sample of a dataset folder that the cache lacks; returns the cache file."""
    from tqdm.auto import tqdm

    spec = reward if isinstance(reward, str) else reward.name
    path = scores_path(data_dir, spec)
    _, samples = load_samples(data_dir)
    cache = _read_cache(path)
    todo = [s for s in samples if cache.get((s["prompt_id"], s["sample"]), ("",))[0]
            != sample_key(s["prompt"], s["response"])]
    logger.info("%s: %d of %d samples already scored", path, len(samples) - len(todo), len(samples))
    if not todo:
        return path
    rw = parse_reward(reward) if isinstance(reward, str) else reward
    drop_partial_line(path)
    with open(path, "a", encoding="utf-8") as fh, \
            tqdm(total=len(todo), unit="sample", desc=f"score {spec}", dynamic_ncols=True) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            scores = rw.score([s["prompt"] for s in batch], [s["response"] for s in batch])
            if len(scores) != len(batch) or not all(math.isfinite(x) for x in scores):
                raise ValueError(f"reward {spec}: expected {len(batch)} finite scores, found "
                                 f"{len(scores)}: {scores[:8]}")
            for s, x in zip(batch, scores):
                fh.write(json.dumps({"prompt_id": s["prompt_id"], "sample": s["sample"],
                                     "key": sample_key(s["prompt"], s["response"]), "score": x}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(batch))
            if hasattr(rw, "stats"):  # hf: rewards report throughput and GPU memory
                st = rw.stats()
                bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v for k, v in st.items()
                                 if k in ("texts_per_s", "peak_gpu_memory_gib")})
    if hasattr(rw, "stats"):
        logger.info("%s: %s", spec, rw.stats())
    return path


def load_scores(data_dir: str | Path, reward: str, samples: Sequence[dict[str, Any]]) -> list[float]:
    """The cached score of each sample (in order); raises if any is missing or stale."""
    path = scores_path(data_dir, reward)
    cache = _read_cache(path)
    out, missing = [], 0
    for s in samples:
        hit = cache.get((s["prompt_id"], s["sample"]))
        if hit is None or hit[0] != sample_key(s["prompt"], s["response"]):
            missing += 1
        else:
            out.append(hit[1])
    if missing:
        raise FileNotFoundError(
            f"{path}: expected scores for {len(samples)} samples, {missing} missing or stale; run "
            f"`vas-vllm score --data {data_dir} --reward {reward}` first")
    return out
