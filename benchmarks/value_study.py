"""What makes a value model accurate? Train each recipe of a study and measure it on held-out data.

    python -m benchmarks.value_study value_models/training/recipes/study/*.yaml --heldout runs/heldout16
    python -m benchmarks.value_study --table          # only rebuild the table from the results

Run from the folder the recipes' relative paths start at (the recipes say which). For every recipe
(a `vas-vllm train` config; a file with `sample:`/`score:`/`train:` sections uses its `train:`
section) it trains the value model (resumable: an interrupted study picks up where it stopped,
and a model already trained is not retrained), then evaluates it with value_models.training.evaluate on
the held-out dataset (prompts never used in training, several samples each):
- Pearson and Spearman of V(prompt + full response) with the reward (target >= 0.95),
- Pearson of V at the prompt with the prompt's mean reward over its held-out samples (>= 0.8),
- for distributional heads, calibration at the prompt, the last prefix and the full text (CRPS,
  PIT histogram, Pearson of the predicted mean).
One JSON per recipe goes to benchmarks/results/value_study/<name>.json (config, data size,
trainable parameters, wall-clock of training and evaluation, metrics) and the table of all of
them to benchmarks/results/value_study.md.

`--ranking` adds the within-sibling ranking (benchmarks/sibling_ranking.py), the accuracy a block
decision of the guided search uses, for every model of the table whose folder still exists: the
prefixes at answer tokens 8, 16 and 24 of the held-out samples (each prompt's first sample),
K = 8 siblings of 8 tokens each, each sibling's value the mean reward of --rollouts rollouts to 40
tokens; the within-prefix Spearman (and top-1) of V (distributional: its mean and E[max of the K
samples the next decision draws]) at prefix + sibling against those values, beside the
partial-text reward's, with the noise ceiling. The siblings are drawn once (cached beside the
held-out data), so every model, also one trained later, is ranked on the same siblings.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "value_study"
logger = logging.getLogger("benchmarks.value_study")


def _train_config(recipe: Path):
    from value_models.training.train_config import TrainConfig, load_yaml, step_section

    return TrainConfig.model_validate(step_section(load_yaml(recipe), "train"))


def run_recipe(recipe: Path, heldout: Path, out_dir: Path) -> dict[str, Any]:
    """Train (unless done) and evaluate one recipe; returns and writes its result."""
    from value_models.training.trainer import train_value_model

    cfg = _train_config(recipe)
    model = Path(cfg.out).expanduser()
    if not (model / "vas.json").is_file() or (model / ".checkpoint").exists():
        logger.info("%s: training %s", recipe.name, model)
        train_value_model(cfg)
    return evaluate_model(recipe.stem, model, heldout, out_dir, recipe=str(recipe))


def evaluate_model(name: str, model: Path, heldout: Path, out_dir: Path,
                   recipe: str | None = None) -> dict[str, Any]:
    """Evaluate a trained value model (its vas.json says how it was trained) on `heldout`."""
    from value_models.training.evaluate import value_reward_correlation
    from value_models.metadata import VASMetadata

    meta = VASMetadata.load(model)
    t0 = time.perf_counter()
    metrics = value_reward_correlation(model, heldout, meta.reward or "vader_positive")
    eval_s = time.perf_counter() - t0
    tr = meta.training
    result = {
        "name": name, "recipe": recipe, "model": str(model), "config": tr.get("config"),
        "head": meta.value_head, "bins": len(meta.bins) if meta.bins else None,
        "layers": (tr.get("init") or {}).get("num_layers"),
        "train_samples": tr["dataset"]["train_samples"], "val_samples": tr["dataset"]["val_samples"],
        "dataset": tr["dataset"],
        "train_s": tr.get("time_s"), "eval_s": round(eval_s, 1), "history": tr.get("history"),
        "heldout": str(heldout), "metrics": metrics,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


RANKING_BOUNDARIES = (8, 16, 24)


def ranking_args(heldout: Path, prompts: int, rollouts: int):
    """sibling_ranking's settings for the study's ranking metric."""
    from benchmarks import sibling_ranking

    return argparse.Namespace(
        prompts=prompts, prompt_offset=0, boundaries=list(RANKING_BOUNDARIES), k=8, block=8,
        rollouts=rollouts, max_tokens=40, reward="vader_positive", seed=0, heldout=heldout,
        siblings=heldout / f"siblings.vader_positive.p{prompts}.r{rollouts}.json", value_model=[],
        out=sibling_ranking.RESULTS / "unused")


def add_ranking(results: list[dict[str, Any]], heldout: Path, out_dir: Path, prompts: int,
                rollouts: int, folders: dict[str, str] | None = None) -> dict[str, Any]:
    """Rank the siblings with every result's model that still exists (or with folders[name],
    for instance a shipped run's embedded rebuild); writes each result's "ranking" and returns
    the partial-text baseline's (with the noise ceilings)."""
    from benchmarks import sibling_ranking

    args = ranking_args(heldout, prompts, rollouts)
    data = sibling_ranking.draw_siblings(args)
    base = sibling_ranking.rank(data, {}, args.seed)
    setting = {k: v for k, v in data["key"].items()}
    for r in results:
        folder = (folders or {}).get(r["name"], r["model"])
        if not (Path(folder) / "vas.json").is_file():
            logger.info("%s: %s is gone, not ranked", r["name"], folder)
            continue
        t0 = time.perf_counter()
        rep = sibling_ranking.rank(data, {"V": folder}, args.seed)
        r["ranking"] = {"setting": setting, "folder": folder, "seconds": round(time.perf_counter() - t0, 1),
                        "results": {t: {name: x for name, x in b["scorers"].items() if name.startswith("V")}
                                    for t, b in rep.items()}}
        (out_dir / f"{r['name']}.json").write_text(json.dumps(r, indent=1) + "\n")
    baseline = {"setting": setting, "draw_seconds": data.get("draw_seconds"), "results": base}
    (out_dir / "ranking_baseline.json").write_text(json.dumps(baseline, indent=1) + "\n")
    return baseline


def ranking_table(results: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """Within-sibling Spearman [95%] / top-1 per boundary: the partial-text reward, then each model."""
    bounds = list(baseline["results"])
    s = baseline["setting"]
    lines = [f"Within-sibling ranking: {s['prompts']} held-out prompts, prefixes at answer tokens "
             f"{', '.join(bounds)} of held-out samples, {s['k']} siblings of {s['block']} tokens, each valued "
             f"by the mean reward of {s['rollouts']} rollouts to {s['max_tokens']} tokens "
             "(benchmarks/sibling_ranking.py; Spearman [95%] / top-1, chance top-1 "
             f"{100 / s['k']:.1f}%).", "",
             "| scorer | " + " | ".join(f"boundary {t}" for t in bounds) + " |",
             "|---" * (len(bounds) + 1) + "|"]

    def cell(x: dict[str, Any]) -> str:
        sp = x["spearman"]
        return f"{sp['mean']:.2f} [{sp['lo']:.2f}, {sp['hi']:.2f}] / {100 * x['top1']['mean']:.0f}%"

    b = baseline["results"]
    lines.append("| noise ceiling | " + " | ".join(f"{b[t]['noise_ceiling_spearman']:.2f}" for t in bounds) + " |")
    lines.append("| partial-text reward | " + " | ".join(cell(b[t]["scorers"]["partial-text reward"])
                                                  for t in bounds) + " |")
    for r in results:
        rk = r.get("ranking")
        if not rk or rk["setting"] != s:
            kept = bool(r.get("model")) and (Path(r["model"]) / "vas.json").is_file()
            why = "not ranked yet (--ranking)" if kept else "model not kept"
            lines.append(f"| {r['name']} | " + " | ".join(why for _ in bounds) + " |")
            continue
        for label, per_bound in _ranked_rows(r, bounds):
            lines.append(f"| {label} | " + " | ".join(cell(x) for x in per_bound) + " |")
    return "\n".join(lines + [""] + gain_table(results, baseline))


def _ranked_rows(r: dict[str, Any], bounds: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """A ranked run's rows: one per model statistic ("V", or "V mean" / "V max" for a
    distributional model), labelled with the run's name, with its result at each boundary."""
    res = r["ranking"]["results"]
    return [(r["name"] + ("" if stat == "V" else f" ({stat[2:]})"), [res[t][stat] for t in bounds])
            for stat in res[bounds[0]]]


def gain_table(results: list[dict[str, Any]], baseline: dict[str, Any]) -> list[str]:
    """The decision a block search makes: the selection gain (the value of the scorer's choice minus
    the siblings' mean value), minus the partial-text reward's, paired over the same prefixes [95%].
    Rows ranked before the gain was recorded, on siblings whose models are gone, say so."""
    from benchmarks.sibling_ranking import fmt_gain

    b, s = baseline["results"], baseline["setting"]
    bounds = list(b)

    def ci(x: dict[str, Any] | None) -> str:
        return "–" if x is None else fmt_gain(x)

    lines = ["Selection gain (the value of the scorer's choice among the siblings minus their mean "
             "value); for the models, their gain minus the partial-text reward's, paired [95%]:", "",
             "| scorer | " + " | ".join(f"boundary {t}" for t in bounds) + " |",
             "|---" * (len(bounds) + 1) + "|",
             "| partial-text reward | " + " | ".join(ci(b[t]["scorers"]["partial-text reward"].get("gain"))
                                                  for t in bounds) + " |",
             "| choice by half the rollouts, valued by the other half | "
             + " | ".join(ci(b[t].get("split_half_gain")) for t in bounds) + " |",
             "| the values' own best (biased upwards) | "
             + " | ".join("–" if b[t].get("max_gain_in_sample") is None else f"{b[t]['max_gain_in_sample']:+.3f}"
                          for t in bounds) + " |"]
    for r in results:
        rk = r.get("ranking")
        if not rk or rk["setting"] != s:
            continue
        for label, per_bound in _ranked_rows(r, bounds):
            cells = [ci(x["gain_minus_reward"]) if "gain_minus_reward" in x else "ranked before the gain was recorded"
                     for x in per_bound]
            lines.append(f"| {label} − reward | " + " | ".join(cells) + " |")
    return lines


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | head | layers | tuning | data (prompts x samples) | train samples | epochs | "
             "lambda | train min | Pearson full | Spearman full | Pearson prompt vs mean | "
             "CRPS last | PIT max dev (last) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, m = r["config"] or {}, r["metrics"]
        cal = m.get("calibration_last") or {}
        ds = r.get("dataset") or {}
        prompts = c.get("max_prompts") or ds.get("num_prompts")
        samples = c.get("max_samples_per_prompt") or (ds.get("sampling") or {}).get("num_samples")
        data = f"{prompts} x {samples}"
        tuning = f"LoRA r{c.get('lora_r')}" if c.get("lora") else "full"
        lines.append(
            f"| {r['name']} | {r['head']} | {r['layers']} | {tuning} | {data} | {r['train_samples']} "
            f"| {c.get('epochs')} | {c.get('lam')} | {(r['train_s'] or 0) / 60:.0f} "
            f"| {m['pearson_full']:.3f} | {m['spearman_full']:.3f} "
            f"| {m['pearson_prompt_vs_mean_reward']:.3f} "
            f"| {cal.get('crps', float('nan')):.3f} | {cal.get('pit_max_dev', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", type=Path, help="training recipes (YAML)")
    p.add_argument("--heldout", type=lambda s: Path(s).expanduser(), default=Path("runs/heldout16"),
                   help="held-out dataset, sampled and scored with the recipes' reward")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--evaluate", action="append", default=[], metavar="NAME=FOLDER",
                   help="also evaluate an already trained value model (e.g. an embedded one); "
                   "repeat for several")
    p.add_argument("--table", action="store_true", help="only rebuild the table from the results")
    p.add_argument("--ranking", action="store_true",
                   help="add the within-sibling ranking of every model in the results (module doc)")
    p.add_argument("--ranking-prompts", type=int, default=64, help="held-out prompts for --ranking")
    p.add_argument("--ranking-rollouts", type=int, default=8, help="rollouts per sibling for --ranking")
    p.add_argument("--model-folder", action="append", default=[], metavar="NAME=FOLDER",
                   help="--ranking: rank run NAME's model from FOLDER (e.g. the embedded rebuild of a "
                   "shipped run whose training folder is gone)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.table and (args.recipes or args.evaluate or not args.ranking):
        if not args.recipes and not args.evaluate:
            p.error("give recipes or --evaluate, --ranking or --table")
        pairs = [e.split("=", 1) for e in args.evaluate]
        bad = [e for e, pair in zip(args.evaluate, pairs) if len(pair) != 2]
        if bad:
            p.error(f"--evaluate takes NAME=FOLDER, found {bad}")
        done = [evaluate_model(name, Path(folder), args.heldout, args.out_dir) for name, folder in pairs]
        done += [run_recipe(recipe, args.heldout, args.out_dir) for recipe in args.recipes]
        for r in done:
            logger.info("%s: %s", r["name"], json.dumps({k: v for k, v in r["metrics"].items()
                                                          if isinstance(v, float)}))
    results = [json.loads(f.read_text()) for f in sorted(args.out_dir.glob("*.json"))]
    results = [r for r in results if "name" in r and "metrics" in r]  # runs, not baselines
    results.sort(key=lambda r: r["name"])
    md = table(results)
    base_file = args.out_dir / "ranking_baseline.json"
    if args.ranking:
        folders = dict(e.split("=", 1) for e in args.model_folder if "=" in e)
        if len(folders) != len(args.model_folder):
            p.error(f"--model-folder takes NAME=FOLDER, found {args.model_folder}")
        add_ranking(results, args.heldout, args.out_dir, args.ranking_prompts, args.ranking_rollouts, folders)
    if base_file.is_file():
        md += "\n\n" + ranking_table(results, json.loads(base_file.read_text()))
    (args.out_dir.parent / "value_study.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
