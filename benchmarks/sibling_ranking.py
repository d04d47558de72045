"""Within-sibling ranking: how well a scorer ranks continuations of ONE prefix, the accuracy a
block decision actually uses (pooled Pearson mixes in differences between prompts).

    python -m benchmarks.sibling_ranking                          # embedded models, 64 prompts
    python -m benchmarks.sibling_ranking --prompts 16 --rollouts 2   # quicker
    python -m benchmarks.sibling_ranking --value-model my=PATH --boundaries 8 16 24
    python -m benchmarks.sibling_ranking --heldout ~/.cache/vas-vllm/runs/heldout16 --siblings S.json
                                         # prefixes of held-out samples; siblings cached in S.json

For each held-out prompt and each boundary t (answer tokens): the prefix is the prompt plus the
first t tokens of one sample of the generator (a fresh one, or with --heldout the first sample of
that prompt in a sampled held-out dataset); K siblings continue it by M tokens each; each
sibling's value is the mean reward of R rollouts from it to the full answer length (--max-tokens).
Every scorer scores every sibling (prefix + sibling): each value model (scalar: its value;
distributional: its mean, and E[max of the K samples the next decision draws]), and the reward
applied to the partial text (the baseline to beat), and the blends r + a (V - r) of each model with
it, a cross-fitted over halves of the prefixes (`rank`). Per prefix: the Spearman correlation between
a scorer and the siblings' values, and whether the scorer's best sibling is the values' best
(top-1; chance 1/K). Reported per boundary: the mean over prefixes with a 95% interval, and the
noise ceiling the R rollouts leave: the split-half Spearman of two disjoint halves of the
rollouts, stepped up to R rollouts (Spearman-Brown), is the reliability rel of the sibling
values, and sqrt(rel) bounds any scorer's correlation with them. The same prompts, prefixes and siblings are
used for every scorer (seeded).

The selection gain is what a block decision earns: per prefix, the value of the scorer's choice
(its best sibling; a uniform pick among the scorer's ties, as a search that breaks ties at random
gets) minus the siblings' mean value, and its paired difference to the partial-text reward's. Unlike
the Spearman, rollout noise adds variance to it but no bias (a scorer that does not see the
rollouts picks a sibling whose mean of R rewards is unbiased for its value), and ties in the values
(many siblings whose rollouts all score 0) do not favour a scorer that ties them too. Its reference:
choosing by R/2 rollouts and valuing by the other R/2 (split_half_gain). Writes
results/sibling_ranking.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.sibling_ranking")


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho with average ranks for ties; None when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def mean_ci(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    half = 1.96 * a.std(ddof=1) / np.sqrt(a.size) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "lo": float(a.mean() - half), "hi": float(a.mean() + half), "n": int(a.size)}


def value_outputs(path: str, seqs: list[list[int]], max_len: int, slots: int = 64) -> np.ndarray:
    """Head outputs of a value model at the last token of each sequence: [n, O] (the plugin's
    runtime: exact, batched catch-up forwards)."""
    from vas_vllm.runtime import ValueRuntime

    rt = ValueRuntime.from_pretrained(path, max_slots=slots, max_len=max_len, max_candidates=1)
    out = []
    for i in range(0, len(seqs), slots):
        chunk = seqs[i:i + slots]
        ids = [rt.allocate() for _ in chunk]
        rt.sync(ids, chunk)
        out.append(rt.prefix_outputs(ids).double().numpy())
        for s in ids:
            rt.release(s)
    return np.concatenate(out)


def model_scores(path: str, seqs: list[list[int]], max_len: int, k: int, prompt_lens: list[int],
                 tokenizer: Any) -> dict[str, np.ndarray]:
    """Scores in reward units: {"": V} for a scalar model (a residual one adds its reward of the
    text: V = r + U); {"mean", "max"} for a distributional one (max: E[max of k samples])."""
    from value_models.metadata import VASMetadata
    from vas_vllm.search.scorers import expected_max

    meta = VASMetadata.load(path)
    raw = value_outputs(path, seqs, max_len)                                   # [n, O]
    if meta.value_head != "distributional":
        norm = meta.reward_normalization or {}
        v = raw[:, 0]
        if meta.residual:
            from vas_vllm.residual import ResidualReward

            res = ResidualReward(path, meta, tokenizer)
            r = res.raw([res.prompt_text(s[:n]) for s, n in zip(seqs, prompt_lens)],
                        [s[n:] for s, n in zip(seqs, prompt_lens)])
            v = v + np.asarray(res.standardised(r))
        return {"": v * norm.get("std", 1.0) + norm.get("mean", 0.0)}
    p = np.exp(raw - raw.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    bins = np.asarray(meta.bins)
    return {"mean": p @ bins, "max": expected_max(p, bins, k)}


# what the drawn siblings depend on: a cache made with other values is drawn again
_DRAW_KEYS = ("prompts", "prompt_offset", "boundaries", "k", "block", "rollouts", "max_tokens", "reward", "seed")


def _draw_key(args: argparse.Namespace) -> dict[str, Any]:
    key = {k: getattr(args, k) for k in _DRAW_KEYS}
    key["heldout"] = str(args.heldout) if args.heldout else None
    return key


def heldout_answers(data_dir: Path, n: int, offset: int) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Prompts, prompt ids and the first sample's answer ids of prompts offset..offset+n of a
    sampled held-out dataset (`vas-vllm sample`): the prefixes are then those of held-out samples."""
    from value_models.training.sampling import load_samples

    _, samples = load_samples(data_dir)
    first = {s["prompt_id"]: s for s in samples if s["sample"] == 0}
    ids = sorted(first)[offset:offset + n]
    if len(ids) < n:
        raise ValueError(f"{data_dir} has {len(first)} prompts, {offset + n} needed (--prompts/--prompt-offset)")
    return ([first[i]["prompt"] for i in ids], [list(first[i]["prompt_token_ids"]) for i in ids],
            [list(first[i]["response_token_ids"]) for i in ids])


def draw_siblings(args: argparse.Namespace) -> dict[str, Any]:
    """The prefixes, their K siblings, the siblings' rollout rewards [C, K, R] and the partial-text
    reward of each prefix + sibling; seeded, so every scorer sees the same siblings. Cached in
    --siblings (JSON) when given: a later run with the same settings only scores new models."""
    key = _draw_key(args)
    if args.siblings and args.siblings.is_file():
        cached = json.loads(args.siblings.read_text())
        if cached.get("key") == key:
            logger.info("siblings from %s", args.siblings)
            return cached
        logger.info("%s was drawn with other settings: drawing again", args.siblings)
    from vas_vllm.local_engine import in_process_engine_kwargs

    layout = in_process_engine_kwargs()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from value_models import embedded
    from value_models.training.prompts import heldout_prompts
    from value_models.training.rewards import parse_reward

    t0 = time.perf_counter()
    gen = embedded.build_smollm2("bfloat16")
    llm = LLM(model=str(gen), dtype="bfloat16", max_model_len=256, seed=0, enforce_eager=True,
              max_num_seqs=256, kv_cache_memory_bytes=1 << 30, max_num_batched_tokens=16384,
              enable_prefix_caching=True, block_size=32, **layout)
    tok = llm.get_tokenizer()
    reward = parse_reward(args.reward)
    K, M, R, T = args.k, args.block, args.rollouts, args.max_tokens

    def sp(seed: int, n: int, max_tokens: int):
        return SamplingParams(temperature=1.0, top_p=1.0, seed=seed, n=n, max_tokens=max_tokens, detokenize=False)

    if args.heldout:   # prefixes of held-out samples
        prompts, pids, answers = heldout_answers(args.heldout, args.prompts, args.prompt_offset)
    else:              # one fresh sample per prompt gives the prefixes of every boundary
        prompts = heldout_prompts(args.prompt_offset + args.prompts)[args.prompt_offset:]
        pids = [tok(p)["input_ids"] for p in prompts]
        base = llm.generate([TokensPrompt(prompt_token_ids=p) for p in pids],
                            [sp(args.seed * 10**6 + i, 1, max(args.boundaries)) for i in range(len(pids))],
                            use_tqdm=False)
        answers = [list(o.outputs[0].token_ids) for o in base]
    cases = []   # (prompt index, boundary, prefix ids)
    for i, toks in enumerate(answers):
        for t in args.boundaries:
            if len(toks) >= t:  # an answer that ended before t has no prefix there
                cases.append((i, t, pids[i] + toks[:t]))
    sib = llm.generate([TokensPrompt(prompt_token_ids=c[2]) for c in cases],
                       [sp(args.seed * 10**6 + 500_000 + j, K, M) for j in range(len(cases))], use_tqdm=False)
    siblings = [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in sib]
    roll_prompts, roll_params, where = [], [], []
    for j, (case, sibs) in enumerate(zip(cases, siblings)):
        for s, toks in enumerate(sibs):
            left = T - case[1] - len(toks)
            if left > 0 and not (toks and toks[-1] == tok.eos_token_id):
                roll_prompts.append(TokensPrompt(prompt_token_ids=case[2] + toks))
                roll_params.append(sp(args.seed * 10**6 + 900_000 + 64 * j + s, R, left))
                where.append((j, s))
    rolled = llm.generate(roll_prompts, roll_params, use_tqdm=True) if roll_prompts else []
    values = np.zeros((len(cases), K, R))                                       # [C, K, R]
    tails: dict[tuple[int, int], list[list[int]]] = {}
    for (j, s), o in zip(where, rolled):
        tails[(j, s)] = [list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)]
    flat_p, flat_r, slots = [], [], []
    for j, case in enumerate(cases):
        answer = case[2][len(pids[case[0]]):]
        for s in range(K):
            for r in range(R):
                tail = tails.get((j, s), [[]] * R)[r]   # a sibling that ended is its own answer
                flat_p.append(prompts[case[0]])
                flat_r.append(tok.decode(answer + siblings[j][s] + tail, skip_special_tokens=True))
                slots.append((j, s, r))
    for (j, s, r), v in zip(slots, reward.score(flat_p, flat_r)):
        values[j, s, r] = v
    partial = reward.score([prompts[c[0]] for c in cases for _ in range(K)],
                           [tok.decode(c[2][len(pids[c[0]]):] + siblings[j][s], skip_special_tokens=True)
                            for j, c in enumerate(cases) for s in range(K)])
    data = {"key": key, "prompts": prompts, "prompt_ids": pids,
            "cases": [{"prompt": c[0], "boundary": c[1], "prefix": c[2]} for c in cases],
            "siblings": siblings, "values": values.tolist(),
            "partial": np.asarray(partial).reshape(len(cases), K).tolist(),
            "draw_seconds": time.perf_counter() - t0}
    if args.siblings:
        args.siblings.parent.mkdir(parents=True, exist_ok=True)
        args.siblings.write_text(json.dumps(data) + "\n")
    return data


ALPHAS = tuple(i / 20 for i in range(21))   # the blends' weights on (model - reward)
REWARD = "partial-text reward"


def tie_groups(r: np.ndarray) -> list[list[int]]:
    """Indices of equal values of r (partial-text rewards of one prefix's siblings: equal texts
    as VADER reads them give bitwise equal scores)."""
    groups: dict[float, list[int]] = {}
    for i, x in enumerate(r.tolist()):
        groups.setdefault(x, []).append(i)
    return list(groups.values())


def blend_name(model: str) -> str:
    return f"reward + a ({model} - reward)"


def tiebreak_name(model: str) -> str:
    return f"reward, ties by {model}"


def rank(data: dict[str, Any], models: dict[str, str], seed: int = 0,
         extra_scores: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per boundary and scorer (the partial-text reward and every model's statistics): the mean
    within-prefix Spearman and top-1 agreement with the siblings' values, with 95% intervals, and
    the noise ceiling of those values. `extra_scores`: more scorers, [C, K] each (tests).

    Blends: for every model statistic V, the partial-text reward r plus a (V - r), a in ALPHAS
    (for a residual model V = r + U this is the shrunk residual r + a U). a is cross-fitted: chosen
    (the largest mean Spearman, the smallest a on ties) on one half of the boundary's prefixes and
    scored on the other, both ways, so the blend's figure carries no selection bias; `alphas`
    gives the two choices. "reward, ties by V" orders by r and, among siblings with equal r only, by
    V (the smallest possible use of a model). Each model statistic also gets `within_reward_ties`: its mean Spearman
    within the groups of >= 3 siblings whose partial-text rewards are equal, where the reward
    ranks nothing and a value model has to."""
    from scipy.stats import rankdata
    from transformers import AutoTokenizer

    from value_models import embedded

    cases, K = data["cases"], data["key"]["k"]
    values = np.asarray(data["values"])                                         # [C, K, R]
    R = values.shape[-1]
    scores: dict[str, np.ndarray] = {REWARD: np.asarray(data["partial"])}
    if models:
        tok = AutoTokenizer.from_pretrained(str(embedded.build_smollm2("bfloat16")))  # vLLM's tokenizer
        seqs = [c["prefix"] + data["siblings"][j][s] for j, c in enumerate(cases) for s in range(K)]
        plens = [len(data["prompt_ids"][c["prompt"]]) for c in cases for _ in range(K)]
        for name, path in models.items():
            for stat, arr in model_scores(path, seqs, 256, K, plens, tok).items():
                scores[f"{name} {stat}".strip()] = arr.reshape(len(cases), K)
    scores.update(extra_scores or {})
    # the reward, its ties broken by each model: dense rank of r (steps of 1) plus V's rank
    # within the prefix scaled into [0, 0.5), so V orders only siblings whose r is equal
    ties_by = {tiebreak_name(n): np.stack([rankdata(r, method="dense") + 0.5 * (rankdata(v) - 1) / len(v)
                                           for r, v in zip(scores[REWARD], arr)])
               for n, arr in scores.items() if n != REWARD}
    target = values.mean(-1)                                                    # [C, K]
    # the best by the values, ties included: two means of R rewards that are equal in exact
    # arithmetic differ by at most their float64 summation error, R * eps * max |reward|
    tie = R * np.finfo(np.float64).eps * max(1.0, float(np.abs(values).max()))

    def per_prefix(arr: np.ndarray, idx: list[int]) -> tuple[list[float], list[float]]:
        rhos = [x for x in (spearman(arr[j], target[j]) for j in idx) if x is not None]
        return rhos, [float(target[j][int(np.argmax(arr[j]))] >= target[j].max() - tie) for j in idx]

    def gains(arr: np.ndarray, idx: list[int]) -> np.ndarray:
        """Per prefix: the value of the scorer's choice (its best, a uniform pick among the
        scorer's ties) minus the mean value of the siblings."""
        return np.array([target[j][arr[j] == arr[j].max()].mean() - target[j].mean() for j in idx])

    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {}
    for t in data["key"]["boundaries"]:
        idx = [j for j, c in enumerate(cases) if c["boundary"] == t]
        per: dict[str, Any] = {}
        base = gains(scores[REWARD], idx)
        for name, arr in {**scores, **ties_by}.items():
            rhos, top1 = per_prefix(arr, idx)
            g = gains(arr, idx)
            per[name] = {"spearman": mean_ci(rhos), "top1": mean_ci(top1), "gain": mean_ci(g.tolist()),
                         "gain_minus_reward": mean_ci((g - base).tolist())}
        halves_idx = (idx[:len(idx) // 2], idx[len(idx) // 2:])
        for name in [n for n in scores if n != REWARD]:
            r, diff = scores[REWARD], scores[name] - scores[REWARD]
            rhos, top1, alphas, gain, gain_diff = [], [], [], [], []
            for fit, test in (halves_idx, halves_idx[::-1]):
                fits = [np.mean(per_prefix(r + a * diff, fit)[0] or [-np.inf]) for a in ALPHAS]
                # the smallest a within float64 rounding of the best mean (equal rankings give
                # equal means; distinct ones differ by far more than 1e-12)
                a = ALPHAS[min(i for i, f in enumerate(fits) if f >= max(fits) - 1e-12)]
                got = per_prefix(r + a * diff, test)
                rhos, top1, alphas = rhos + got[0], top1 + got[1], alphas + [a]
                g = gains(r + a * diff, test)
                gain, gain_diff = gain + g.tolist(), gain_diff + (g - gains(r, test)).tolist()
            per[blend_name(name)] = {"spearman": mean_ci(rhos), "top1": mean_ci(top1), "alphas": alphas,
                                     "gain": mean_ci(gain), "gain_minus_reward": mean_ci(gain_diff)}
            # what the model adds where the reward cannot tell siblings apart: its Spearman within
            # each group of >= 3 siblings whose partial-text rewards are equal
            within = [x for j in idx for g in tie_groups(r[j]) if len(g) >= 3
                      for x in [spearman(scores[name][j][g], target[j][g])] if x is not None]
            per[name]["within_reward_ties"] = mean_ci(within)
        halves, half_gains = [], []
        for j in idx:  # split-half reliability of the sibling values
            perm = rng.permutation(R)
            a, b = values[j][:, perm[:R // 2]].mean(-1), values[j][:, perm[R // 2:]].mean(-1)
            x = spearman(a, b)
            if x is not None:
                halves.append(x)
            half_gains.append(b[a == a.max()].mean() - b.mean())
        half = float(np.mean(halves)) if halves else float("nan")
        # reliability of the R-rollout mean (Spearman-Brown from two halves); no scorer can
        # correlate with a target of reliability rel better than sqrt(rel)
        rel = 2 * half / (1 + half) if half > -1 else float("nan")
        ceiling = float(np.sqrt(rel)) if rel > 0 else float("nan")
        # the gain of choosing by R/2 rollouts, valued by the other R/2: what a scorer as good as
        # half the rollouts earns (the noisy oracle; the values' own best is biased upwards)
        report[str(t)] = {"prefixes": len(idx), "scorers": per, "split_half_spearman": half,
                          "reliability": rel, "noise_ceiling_spearman": ceiling,
                          "split_half_gain": mean_ci(half_gains),
                          "max_gain_in_sample": float(np.mean([target[j].max() - target[j].mean() for j in idx]))}
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    from value_models import embedded

    t0 = time.perf_counter()
    models = dict(args.value_model) if args.value_model else {
        "positive": str(embedded.build_positive()), "positive-dist": str(embedded.build_positive_dist())}
    data = draw_siblings(args)
    report = rank(data, models, args.seed)
    out = {**{k: v for k, v in data["key"].items() if k != "heldout"}, "prompts": len(data["prompts"]),
           "heldout": data["key"]["heldout"], "value_models": models, "results": report,
           "seconds": time.perf_counter() - t0}
    return out


def fmt_gain(x: dict[str, float]) -> str:
    """A signed mean with its 95% interval (mean_ci's dict), as the gain tables print it."""
    return f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]"


def table(res: dict[str, Any]) -> str:
    names = list(next(iter(res["results"].values()))["scorers"])
    lines = ["| boundary (answer tokens) | " + " | ".join(f"{n}: Spearman / top-1" for n in names)
             + " | noise ceiling |", "|---" * (len(names) + 2) + "|"]
    for t, r in res["results"].items():
        cells = [f"{r['scorers'][n]['spearman']['mean']:.2f} [{r['scorers'][n]['spearman']['lo']:.2f}, "
                 f"{r['scorers'][n]['spearman']['hi']:.2f}] / {100 * r['scorers'][n]['top1']['mean']:.0f}%"
                 for n in names]
        lines.append(f"| {t} ({r['prefixes']} prefixes) | " + " | ".join(cells)
                     + f" | {r['noise_ceiling_spearman']:.2f} |")
    lines += ["", "Selection gain (value of the scorer's choice minus the siblings' mean value) [95%]; "
              "minus the partial-text reward's, paired:", "",
              "| boundary | " + " | ".join(names) + " | choice by half the rollouts, valued by the other half "
              "| the values' own best (biased upwards) |", "|---" * (len(names) + 3) + "|"]
    for t, r in res["results"].items():
        cells = []
        for n in names:
            g, d = r["scorers"][n]["gain"], r["scorers"][n]["gain_minus_reward"]
            cells.append(fmt_gain(g) + ("" if n == REWARD else f"; {fmt_gain(d)}"))
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {fmt_gain(r['split_half_gain'])} "
                     f"| {r['max_gain_in_sample']:+.3f} |")
    tied = [n for n in names if "within_reward_ties" in next(iter(res["results"].values()))["scorers"][n]]
    if tied:
        lines += ["", "Within groups of >= 3 siblings with equal partial-text rewards: Spearman [95%] (groups)",
                  "", "| boundary | " + " | ".join(tied) + " |", "|---" * (len(tied) + 1) + "|"]
        for t, r in res["results"].items():
            w = [r["scorers"][n]["within_reward_ties"] for n in tied]
            lines.append(f"| {t} | " + " | ".join(f"{x['mean']:.2f} [{x['lo']:.2f}, {x['hi']:.2f}] ({x['n']})"
                                                  for x in w) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts")
    p.add_argument("--prompt-offset", type=int, default=0, help="skip the first N held-out prompts")
    p.add_argument("--boundaries", type=int, nargs="+", default=[0, 10, 20], help="answer tokens before the siblings")
    p.add_argument("--k", type=int, default=8, help="siblings per prefix")
    p.add_argument("--block", type=int, default=10, help="tokens per sibling")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts per sibling (its value is their mean reward)")
    p.add_argument("--max-tokens", type=int, default=40, help="answer length of a rollout")
    p.add_argument("--reward", default="vader_positive")
    p.add_argument("--value-model", type=lambda s: tuple(s.split("=", 1)), action="append", default=[],
                   metavar="NAME=PATH", help="value models to rank with (default: the embedded ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=Path, default=None,
                   help="a sampled held-out dataset (vas-vllm sample): the prefixes are those of its first "
                   "sample of each prompt (default: a fresh sample of each held-out prompt)")
    p.add_argument("--siblings", type=Path, default=None,
                   help="cache of the drawn siblings and their values (JSON): reused when drawn with the "
                   "same settings, so models added later are ranked on the same siblings")
    p.add_argument("--out", type=Path, default=RESULTS / "sibling_ranking.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    md = table(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"written {args.out} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
