"""Training data for the trainer: a dataset's scored samples as examples (tokens, reward,
prefix rewards), the deterministic validation split, standardisation, and a distributional
head's bins. Shape key: B samples, T response tokens."""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from value_models.training.bon import bon_log_cdf
from value_models.training.prefix_rewards import load_prefix_scores
from value_models.training.rewards import load_scores
from value_models.training.sampling import load_samples
from value_models.training.train_config import TrainConfig


def is_validation(prompt_id: int, seed: int, fraction: float) -> bool:
    """Deterministic per-prompt split (all samples of a prompt fall on the same side)."""
    h = int.from_bytes(hashlib.sha256(f"val\0{seed}\0{prompt_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def prepare_data(cfg: TrainConfig) -> tuple[dict[str, Any], list[dict], list[dict], dict | None]:
    """(dataset meta, train examples, val examples, normalisation) with each example's final
    reward under "reward" and the raw score under "score"."""
    meta, samples = load_samples(cfg.data)
    if cfg.max_prompts is not None:
        keep = set(sorted({s["prompt_id"] for s in samples})[:cfg.max_prompts])
        samples = [s for s in samples if s["prompt_id"] in keep]
    if cfg.max_samples_per_prompt is not None:
        samples = [s for s in samples if s["sample"] < cfg.max_samples_per_prompt]
    if not samples:
        raise ValueError(f"{cfg.data} holds no complete samples")
    scores = load_scores(cfg.data, cfg.reward, samples)
    rewards = (bon_log_cdf(scores, [s["prompt_id"] for s in samples])
               if cfg.reward_transform == "bon_log_cdf" else list(scores))
    prefix = (load_prefix_scores(cfg.data, cfg.reward, samples, meta["generator"])
              if cfg.aux_prefix_weight > 0 or cfg.residual else [None] * len(samples))
    examples = []
    for s, raw, r, pre in zip(samples, scores, rewards, prefix):
        n = len(s["prompt_token_ids"]) + len(s["response_token_ids"]) - 1
        if n > cfg.max_len or not s["response_token_ids"]:
            raise ValueError(f"sample ({s['prompt_id']}, {s['sample']}): expected 1..{cfg.max_len} "
                             f"value-model tokens and a non-empty response, found {n} tokens")
        examples.append({"prompt_id": s["prompt_id"], "prompt_ids": s["prompt_token_ids"],
                         "response_ids": s["response_token_ids"], "score": raw, "reward": r})
        if pre is not None:  # the raw reward of each state's text (standardised below, like r)
            examples[-1]["prefix_rewards"] = pre
    val = [e for e in examples if is_validation(e["prompt_id"], cfg.seed, cfg.val_fraction)]
    train = [e for e in examples if not is_validation(e["prompt_id"], cfg.seed, cfg.val_fraction)]
    if not train:
        raise ValueError(f"val_fraction={cfg.val_fraction} left no training samples of {len(examples)}")
    norm = None
    if cfg.normalization() == "standardize":
        rs = torch.tensor([e["reward"] for e in train], dtype=torch.float64)
        mean, std = float(rs.mean()), float(rs.std()) if len(rs) > 1 else 1.0
        std = std if std > 1e-8 else 1.0
        norm = {"mean": mean, "std": std}
        for e in examples:
            e["reward"] = (e["reward"] - mean) / std
            if "prefix_rewards" in e:
                e["prefix_rewards"] = [(x - mean) / std for x in e["prefix_rewards"]]
    return meta, train, val, norm


def make_bins(cfg: TrainConfig, rewards: list[float]) -> list[float] | None:
    """The reward bins of a distributional head (None for a scalar head): cfg.num_bins
    quantiles of the training rewards (min and max included; repeated values merged) or evenly
    spaced values over their range."""
    if cfg.head != "distributional":
        return None
    r = torch.tensor(rewards, dtype=torch.float64)
    lo, hi = float(r.min()), float(r.max())
    if hi - lo < 1e-9:
        raise ValueError(f"every training reward equals {lo}: a distributional head needs spread")
    if cfg.bin_spacing == "uniform":
        return torch.linspace(lo, hi, cfg.num_bins, dtype=torch.float64).tolist()
    q = torch.quantile(r, torch.linspace(0, 1, cfg.num_bins, dtype=torch.float64))
    bins = sorted({round(float(x), 6) for x in q})
    bins[0], bins[-1] = min(bins[0], lo), max(bins[-1], hi)
    return bins


# ---- model ---------------------------------------------------------------------------------
