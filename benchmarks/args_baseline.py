"""ARGS (arXiv 2402.01694), the token-level baseline that needs no training: the mean rule with V
replaced by the reward of the partial text, l'[a] = l[a] + beta (r(s.a) - mean_topk r), in the
quality benchmark's setting (benchmarks/quality.py: the same prompts, seeds, engine and KL
accounting; its plain row is recomputed here and must equal quality.json's).

    python -m benchmarks.args_baseline                       # betas 0.5 .. 64, 256 prompts
    python -m benchmarks.args_baseline --betas 2 8 --prompts 32
    python -m benchmarks.args_baseline --model positive-residual --betas 2 8 32   # a trained U

--model positive-residual runs the same rows with the embedded residual model (V = r + U, U
trained: issue [M]) in place of the zero head, written to results/residual_quality.json and .md
beside ARGS's row at the same beta (same seeds; note that each model standardises r with its own
training data's mean and std, so a beta means slightly different nats for the two).

How: a residual value model (V = r + U, README "Residual value models") whose head U is zero is
exactly ARGS: the plugin adds r of every candidate's text, standardised with the model's
reward_normalization (here the embedded "positive"'s, so beta has the units of the "vas beta"
rows). It is the embedded "positive" with its score head zeroed (build_args_model), so its
value-model forwards are spent for nothing: the cost column overstates ARGS's by that forward.
Writes results/args_baseline.json and .md: each row beside quality.json's mean-rule row at the
same beta and Best-of-N's curve at its KL (the gap, as quality_report computes it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.args_baseline")
COMMITTED_BETAS = (0.5, 1, 2, 4, 8, 16, 32, 64)   # quality.json's --betas (README's command)


def build_args_model(base: Path, out: Path, reward: str = "vader_positive") -> Path:
    """`base` (a scalar value model folder) with its score head zeroed and vas.json residual on
    `reward`: V(s) = r(s), the reward of the partial text, in base's standardised units."""
    import torch
    from safetensors.torch import load_file, save_file

    from value_models.metadata import VASMetadata

    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
    weights = load_file(str(base / "model.safetensors"))
    heads = [k for k in weights if k.split(".")[0] == "score"]
    if not heads:
        raise ValueError(f"{base}: no score head in model.safetensors")
    for k in heads:
        weights[k] = torch.zeros_like(weights[k])
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((base / "vas.json").read_text())
    meta.update(value_parametrization="residual", reward=reward, reward_transform="identity",
                training={"algorithm": "none: ARGS, V = the reward of the partial text (zero head)",
                          "base": str(base)})
    VASMetadata.model_validate(meta)
    (out / "vas.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=Path, default=RESULTS / "quality.json",
                   help="the quality run to compare with (same prompts, tokens, k and seed)")
    p.add_argument("--model", choices=("args", "positive-residual"), default="args",
                   help="args: the zero-head model (ARGS); positive-residual: the embedded residual model")
    p.add_argument("--out", type=Path, default=None,
                   help="default: results/args_baseline.json (args), results/residual_quality.json")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("args_baseline.json" if args.model == "args" else "residual_quality.json")
    tag = "args" if args.model == "args" else "residual"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    from benchmarks import quality
    from value_models import embedded

    t0 = time.perf_counter()
    if args.model == "args":
        model = build_args_model(embedded.build_positive(), embedded.cache_dir() / "args-positive-zero-head")
    else:
        model = embedded.build_positive_residual()
    qargs = quality._parse(["--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                            "--top-k", str(args.top_k), "--seed", str(args.seed), "--bon-model-n",
                            "--tilts", "--exact-bon-n", "--keep-tilts", "--keep-bon-n"])
    qargs.positive = model   # the runner's "positive" is the ARGS (or residual) model
    run = quality.Runner(qargs)
    # quality.py's seeds: a method's index in the committed run's list (its --betas 0.5 .. 64 come
    # first after plain), so ARGS at beta b answers with the seeds of the mean rule at b
    specs = quality.method_specs(quality._parse(["--prompts", str(args.prompts), "--betas",
                                                 *[str(b) for b in COMMITTED_BETAS]]))
    method_of = {label: 2000 + i for i, (label, *_) in enumerate(specs)}
    rows = [run.single(method_of["plain"], "plain", "plain", None)]
    for b in args.betas:
        label = f"vas beta={b:g}"
        m = method_of.get(label, 3000 + int(b * 10))   # the mean-rule row's seeds where it has one
        rows.append(run.single(m, f"{tag} beta={b:g}", tag,
                               {"vas_model": "positive", "vas_beta": b, "vas_top_k": args.top_k},
                               k=args.top_k, beta=b, tag=f"{b:g}"))
    for r in rows:
        r.pop("checks", None)
    q = json.loads(args.quality.read_text()) if args.quality.is_file() else None
    args_file = RESULTS / "args_baseline.json"   # ARGS's rows, beside a trained residual's
    args_rows = ({r["label"]: r for r in json.loads(args_file.read_text())["rows"]}
                 if tag != "args" and args_file.is_file() else {})
    q_rows = {r["label"]: r for r in (q or {}).get("rows", [])}
    bon = sorted((r["kl"], float(np.mean(r["rewards"]))) for r in q_rows.values() if r.get("kind") == "bon")
    bon = [(0.0, float(np.mean(q_rows["plain"]["rewards"])))] + bon if "plain" in q_rows else bon

    def bon_at(kl: float) -> float | None:   # Best-of-N's reward at this KL (piecewise linear)
        if len(bon) < 2 or kl > bon[-1][0]:
            return None
        return float(np.interp(kl, [x for x, _ in bon], [y for _, y in bon]))

    extra = tag != "args"
    table = ["| method | mean reward [95% CI] | KL (nats) | mean rule 'positive' at this beta | "
             + ("ARGS at this beta | " if extra else "") + "Best-of-N at this KL | s / prompt |",
             "|---|---|---|---|---|---|" + ("---|" if extra else "")]
    for r in rows:
        rw = np.asarray(r["rewards"])
        half = 1.96 * rw.std(ddof=1) / np.sqrt(rw.size)
        same = q_rows.get(r["label"].replace(tag, "vas"))
        twin = args_rows.get(r["label"].replace(tag, "args"))
        b = bon_at(r["kl"])
        table.append(f"| {r['label']} | {rw.mean():+.3f} [{rw.mean() - half:+.3f}, {rw.mean() + half:+.3f}] "
                     f"| {r['kl']:.2f} | "
                     + (f"{np.mean(same['rewards']):+.3f} at KL {same['kl']:.2f}" if same and r["label"] != "plain" else "")
                     + ((" | " + (f"{np.mean(twin['rewards']):+.3f} at KL {twin['kl']:.2f}"
                                  if twin and r["label"] != "plain" else "")) if extra else "")
                     + f" | {'' if b is None else f'{b:+.3f}'} | {r['wall_s'] / len(rw):.3f} |")
    plain_same = bool(q_rows) and q_rows["plain"]["rewards"] == rows[0]["rewards"]
    out = dict(prompts=args.prompts, max_tokens=args.max_tokens, top_k=args.top_k, seed=args.seed,
               betas=args.betas, model=str(model), model_kind=args.model, rows=rows, plain_equals_quality_json=plain_same,
               bon_kl_formula="log N - (N-1)/N",
               seconds=time.perf_counter() - t0,
               machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    md = "\n".join(table) + (f"\n\n- plain row equal to quality.json's (same seeds and engine): {plain_same}"
                             f"\n- {out['machine']}; {out['seconds']:.0f} s\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return out


if __name__ == "__main__":
    main()
