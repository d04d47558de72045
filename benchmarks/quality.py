"""Quality of VAS against plain sampling and Best-of-N: reward, win rate, KL and cost, one run.

    python -m benchmarks.quality                     # 256 held-out prompts, the full grid
    python -m benchmarks.quality --quick             # smoke test: 8 prompts, ~1-2 minutes
    python -m benchmarks.quality --prompts 128 --betas 0.5 1 2 4 8 16 --bon-n 2 4 8 16 32 64 128 \
        --bon-model-n 4 16 64 --max-tokens 40 --seed 0

One vLLM engine (logprobs_mode="processed_logprobs") serves the embedded SmolLM2-135M-Instruct
generator with the embedded value models "positive" and "positive-bon". Every method answers the
same held-out prompts (value_models.training.prompts.heldout_prompts: tweet prefixes never used in
training) at temperature 1.0, top-p 1, up to --max-tokens new tokens, each method with its own
per-prompt seeds; every answer is scored by the same reward (vader_positive of prompt +
response). Methods:
- plain sampling;
- VAS with "positive" at each --betas (k = --top-k);
- VAS with "positive-bon" at each --bon-model-n (vas_bon_n = N, i.e. beta = N - 1);
- exact tilts with the distributional model "positive-dist" (exact-tilts.md): the exponential tilt
  p* ∝ pi_ref exp(beta r) at each --tilts (vas_tilt), and exact Best-of-N at each --exact-bon-n
  (vas_bon_n with a distributional model); its measured KL is reported beside the exact
  Best-of-N's log N - (N-1)/N; the same rules with vas_rest "keep" at each --keep-tilts and
  --keep-bon-n (the rest's h is the candidates' mean instead of conservation's);
- Best-of-N for each --bon-n: vLLM n = Nmax = max(--bon-n) samples per prompt are drawn ONCE,
  and Best-of-N's reward (and win rate) per prompt is the average over all N-subsets of those
  Nmax samples of the best sample's reward (quality_stats.best_of_n: unbiased, like taking the
  first N samples, with lower variance). Its cost is N/Nmax of the measured Nmax run: generated
  tokens N/Nmax * (tokens of the Nmax samples), wall-clock N/Nmax * (generation + reward scoring
  of the Nmax run). --bon-timed N... also times Best-of-N separately (its own n=N run plus
  scoring), reported beside the scaled figure.

Per method: mean reward with a 95% interval over prompts (normal approximation), win rate
against plain sampling (per prompt, ties count half, 95% interval), KL from the generator, and
cost (generated tokens, value-model tokens scored = generated tokens x k for VAS, wall-clock of
the generate call, plus reward scoring for Best-of-N; per prompt).

KL for plain and VAS: mean over samples of sum_t (log pi(y_t) - log pi_ref(y_t)), with
log pi(y_t) the sampled token's processed log-probability from vLLM (logprobs=0 with
logprobs_mode=processed_logprobs: after the VAS processor, at T=1 with no top-k/top-p) and
log pi_ref(y_t) the generator's log-probability of the same token from prompt_logprobs of a plain
request over prompt + response (vLLM computes prompt logprobs from the raw logits, without
logits processors). Plain sampling's KL must be ~0: it is reported as a sanity check. For
Best-of-N the KL is the formula log N - (N-1)/N (an upper bound for discrete rewards).
As a cross-check, log pi_ref of the first --check-ref answers of each method is recomputed with
transformers (fp32 forward of the bf16 weights) and compared with both vLLM figures.

Writes <out-dir>/<name>.json, <name>.md (the table), <name>_reward_kl.png and
<name>_reward_cost.png (name: quality, or quality_quick with --quick).
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

import numpy as np

from benchmarks.quality_report import plot, summarise, table, targets
from benchmarks.quality_stats import best_of_n, bon_kl, mean_ci, sequence_kl

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.quality")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts")
    p.add_argument("--max-tokens", type=int, default=40, help="new tokens per answer (at most)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16],
                   help="VAS strengths with the 'positive' model")
    p.add_argument("--top-k", type=int, default=20, help="VAS candidates per step")
    p.add_argument("--bon-n", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128],
                   help="Best-of-N sizes (one run of n = max draws all samples)")
    p.add_argument("--bon-model-n", type=int, nargs="*", default=[4, 16, 64],
                   help="vas_bon_n values with the 'positive-bon' model (none: skip it)")
    p.add_argument("--tilts", type=float, nargs="*", default=[1, 2, 4, 8],
                   help="vas_tilt strengths with the distributional model (none: skip)")
    p.add_argument("--exact-bon-n", type=int, nargs="*", default=[4, 16, 64],
                   help="vas_bon_n values with the distributional model: exact Best-of-N (none: skip)")
    p.add_argument("--keep-tilts", type=float, nargs="*", default=[1, 2, 4, 8, 16],
                   help="vas_tilt strengths with vas_rest 'keep' (none: skip)")
    p.add_argument("--keep-bon-n", type=int, nargs="*", default=[4, 16, 64],
                   help="exact vas_bon_n values with vas_rest 'keep' (none: skip)")
    p.add_argument("--positive", type=Path, default=None,
                   help="value-model folder to use as 'positive' (default: the embedded one)")
    p.add_argument("--dist", type=Path, default=None,
                   help="value-model folder to use as 'positive-dist' (default: the embedded one)")
    p.add_argument("--bon-timed", type=int, nargs="*", default=[],
                   help="Best-of-N sizes also timed in their own run (besides the N/Nmax scaling)")
    p.add_argument("--seed", type=int, default=0, help="base seed (each method its own seeds)")
    p.add_argument("--check-ref", type=int, default=4,
                   help="answers per plain/VAS method whose log pi_ref is recomputed with "
                   "transformers (fp32 forward of the bf16 weights) as a cross-check; 0: skip")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: vLLM's)")
    p.add_argument("--bon-chunk", type=int, default=16,
                   help="prompts per generate call of the Best-of-Nmax run (each chunk is saved)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore <out-dir>/<name>.partial.json; by default a run resumes there "
                   "(finished methods and Best-of-N chunks are not redone)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 8 prompts, 16 tokens, betas 1 4, Best-of-2/4/8, bon-n 4")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens, args.betas, args.bon_n = 8, 16, [1.0, 4.0], [2, 4, 8]
        args.bon_model_n = args.bon_model_n[:1]
        args.tilts, args.exact_bon_n = args.tilts[:1], args.exact_bon_n[:1]
        args.keep_tilts, args.keep_bon_n = args.keep_tilts[:1], args.keep_bon_n[:1]
    args.name = "quality_quick" if args.quick else "quality"
    return args


class Runner:
    """One engine, the prompts, the reward, and per-method seeds."""

    def __init__(self, args: argparse.Namespace, start_engine: bool = True) -> None:
        from vas_vllm.local_engine import in_process_engine_kwargs

        layout = in_process_engine_kwargs()  # the engine in this process, on every core
        from vllm import LLM

        from value_models import embedded
        from value_models.training.prompts import heldout_prompts
        from value_models.training.rewards import parse_reward
        from vas_vllm import vas_engine_kwargs

        self.args = args
        gen = embedded.build_smollm2("bfloat16")
        values = {"positive": str(args.positive or embedded.build_positive())}
        if args.bon_model_n:
            values["positive-bon"] = str(embedded.build_positive_bon())
        if args.tilts or args.exact_bon_n or args.keep_tilts or args.keep_bon_n:
            values["positive-dist"] = str(args.dist or embedded.build_positive_dist())
        self.prompts = heldout_prompts(args.prompts)
        self.reward = parse_reward("vader_positive")
        self.gen, self.engine_s = gen, 0.0
        if not start_engine:  # a resumed run with nothing left to generate
            return
        t0 = time.perf_counter()
        self.llm = LLM(model=str(gen), dtype="bfloat16", max_model_len=256, seed=args.seed,
                       max_num_seqs=256, kv_cache_memory_bytes=1 << 30,
                       # room for 256 whole prompts per step: a chunked seeded prefill fails on CPU
                       max_num_batched_tokens=16384, enforce_eager=True, **layout,
                       logprobs_mode="processed_logprobs",
                       **vas_engine_kwargs(value_models=values, default_top_k=args.top_k,
                                           max_len=256))
        self.engine_s = time.perf_counter() - t0
        # warm-up, untimed and not part of any method: first-call costs (oneDNN kernels for the
        # batch shapes, logprobs, the value-model runtimes) made the first timed method several
        # times slower per prompt in short runs. Every prompt once with plain sampling as the
        # methods sample it, then a few short VAS requests per value model.
        self.llm.generate(self.prompts, [self.params(i, 0, logprobs=0) for i in
                                         range(len(self.prompts))], use_tqdm=False)
        warm = [self.params(i, 0, max_tokens=4, logprobs=0, extra_args={"vas_model": m})
                for i in range(8) for m in values]
        self.llm.generate([self.prompts[i % len(self.prompts)] for i in range(len(warm))], warm,
                          use_tqdm=False)

    def params(self, i: int, base: int, **kw: Any):
        """Prompt i's SamplingParams. Seeds: base + 1000 i; vLLM gives the j-th of n > 1
        samples seed + j, so with n <= 1000 no two samples of a run share a seed."""
        from vllm import SamplingParams

        kw.setdefault("max_tokens", self.args.max_tokens)
        return SamplingParams(temperature=1.0, top_p=1.0, seed=base + 1000 * i, **kw)

    def seed_base(self, method: int) -> int:
        """Seed base of the method-th method: 10^7 apart (room for 10^4 prompts)."""
        return self.args.seed * 10**12 + (method + 1) * 10**7

    def generate(self, params: list, idx: list[int] | None = None) -> tuple[list, float]:
        prompts = self.prompts if idx is None else [self.prompts[i] for i in idx]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return outs, time.perf_counter() - t0

    def ref_logprobs(self, outs: list) -> list[list[float]]:
        """The generator's unprocessed log pi_ref of each answer's tokens (prompt_logprobs of a
        plain request over prompt + answer; no vas_* key, so no processor touches it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reqs, lens = [], []
        for o in outs:
            c = o.outputs[0]
            reqs.append(TokensPrompt(prompt_token_ids=list(o.prompt_token_ids) + list(c.token_ids)))
            lens.append(len(c.token_ids))
        # No seed: vLLM 0.32 on CPU fails on a seeded request whose prefill is chunked
        # ("CPU Generator does not use offset"), and these prompts are long enough to be chunked.
        sp = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0)
        scored = self.llm.generate(reqs, sp, use_tqdm=False)
        out = []
        for req, o, n in zip(reqs, scored, lens):
            ids = req["prompt_token_ids"]
            pl = o.prompt_logprobs  # [len(ids)] of {token: Logprob} (None at position 0)
            out.append([pl[j][ids[j]].logprob for j in range(len(ids) - n, len(ids))])
        return out

    def single(self, method: int, label: str, kind: str, extra: dict | None, k: int = 0,
               **info: Any) -> dict:
        """Plain or VAS: one answer per prompt, processed logprobs, rewards, KL."""
        base = self.seed_base(method)
        outs, wall = self.generate([self.params(i, base, logprobs=0, extra_args=extra)
                                    for i in range(len(self.prompts))])
        texts = [o.outputs[0].text for o in outs]
        rewards = np.array(self.reward.score(self.prompts, texts))  # [P]
        lps = [[d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
               for o in outs]
        t0 = time.perf_counter()
        ref = self.ref_logprobs(outs)
        kl = sequence_kl(lps, ref)  # [P]
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        per_token = np.concatenate([np.subtract(a, b) for a, b in zip(lps, ref)])
        checks = [dict(label=label, prompt_ids=list(o.prompt_token_ids),
                       ids=list(o.outputs[0].token_ids), lp=lp, ref=rf)
                  for o, lp, rf in list(zip(outs, lps, ref))[: self.args.check_ref]]
        return dict(label=label, kind=kind, rewards=rewards.tolist(), kl=float(kl.mean()),
                    kl_ci=list(mean_ci(kl)[1:]), kl_token_abs=float(np.abs(per_token).mean()),
                    gen_tokens=tokens, value_tokens=tokens * k, wall_s=wall,
                    kl_rescoring_s=time.perf_counter() - t0, texts=texts[:4], checks=checks,
                    **info)

    def best_of_chunk(self, method: int, nmax: int, idx: list[int]) -> dict:
        """Nmax samples for each prompt in idx, scored: one chunk of the Best-of-Nmax run."""
        base = self.seed_base(method)
        outs, wall = self.generate([self.params(i, base, n=nmax) for i in idx], idx)
        t0 = time.perf_counter()
        rewards = [self.reward.score([self.prompts[i]] * nmax, [c.text for c in o.outputs])
                   for i, o in zip(idx, outs)]  # [len(idx), Nmax]
        return dict(idx=idx, rewards=rewards, wall_s=wall, score_s=time.perf_counter() - t0,
                    gen_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))


def bon_rows(sizes: list[int], chunks: list[dict]) -> tuple[list[dict], dict]:
    """Best-of-N rows for every N in sizes from the chunks of one Best-of-Nmax run."""
    nmax = max(sizes)
    chunks = sorted(chunks, key=lambda c: c["idx"][0])
    rewards = np.array([r for c in chunks for r in c["rewards"]])  # [P, Nmax]
    wall = sum(c["wall_s"] for c in chunks)
    score_s = sum(c["score_s"] for c in chunks)
    tokens = sum(c["gen_tokens"] for c in chunks)
    run = dict(nmax=nmax, wall_s=wall, score_s=score_s, gen_tokens=tokens, chunks=len(chunks))
    rows = [dict(label=f"best-of-{n}", kind="bon", n=n, rewards=best_of_n(rewards, n).tolist(),
                 kl=bon_kl(n), gen_tokens=tokens * n / nmax, value_tokens=0,
                 wall_s=(wall + score_s) * n / nmax, wall_scaled_from=nmax, tag=str(n))
            for n in sorted(sizes)]
    return rows, dict(run, rewards_matrix=rewards)


def best_of_timed(run: Runner, method: int, n: int) -> dict:
    """Best-of-n in its own run: wall-clock of generation + reward scoring (the best kept)."""
    base = run.seed_base(method)
    outs, wall = run.generate([run.params(i, base, n=n) for i in range(len(run.prompts))])
    t0 = time.perf_counter()
    best = [max(run.reward.score([p] * n, [c.text for c in o.outputs]))
            for p, o in zip(run.prompts, outs)]
    return dict(n=n, wall_s=wall + time.perf_counter() - t0, generate_s=wall,
                mean_reward=float(np.mean(best)),
                gen_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))


def check_ref_with_transformers(gen: Path, checks: list[dict]) -> dict:
    """Recompute log pi_ref of the kept answers with transformers; compare with vLLM's prompt
    logprobs (should agree up to bf16 rounding) and with the processed logprobs (equal for plain
    sampling, different under VAS)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gen, dtype=torch.bfloat16).float().eval()
    by_label: dict[str, dict[str, list[float]]] = {}
    for c in checks:
        ids = torch.tensor([c["prompt_ids"] + c["ids"]])  # [1, S]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()  # [S-1, V]: position j predicts j+1
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]  # [S-1]
        hf = lp[-len(c["ids"]):].tolist()  # [T]
        d = by_label.setdefault(c["label"], {"ref": [], "processed": []})
        d["ref"] += [abs(a - b) for a, b in zip(hf, c["ref"])]
        d["processed"] += [abs(a - b) for a, b in zip(hf, c["lp"])]
    return {k: {"tokens": len(v["ref"]),
                "mean_abs_vllm_prompt_logprobs_vs_hf": float(np.mean(v["ref"])),
                "max_abs_vllm_prompt_logprobs_vs_hf": float(np.max(v["ref"])),
                "mean_abs_processed_logprobs_vs_hf": float(np.mean(v["processed"]))}
            for k, v in by_label.items()}


def method_specs(args: argparse.Namespace) -> list[tuple[str, str, dict | None, dict]]:
    """(label, kind, extra_args, info) of every single-answer method, in a fixed order: a
    method's index in this list picks its seeds, and its label is its key in a resumed run."""
    k = args.top_k
    specs: list[tuple[str, str, dict | None, dict]] = [("plain", "plain", None, {})]
    specs += [(f"vas beta={b:g}", "vas", {"vas_model": "positive", "vas_beta": b, "vas_top_k": k},
               dict(k=k, beta=b, tag=f"{b:g}")) for b in args.betas]
    specs += [(f"vas-bon N={n}", "vas_bon", {"vas_model": "positive-bon", "vas_bon_n": n,
                                              "vas_top_k": k}, dict(k=k, n=n, tag=str(n)))
              for n in args.bon_model_n]
    # the distributional model's rules, first with conservation's rest, then with vas_rest keep
    for rest, tilts, bon_ns in (("", args.tilts, args.exact_bon_n),
                                ("keep", args.keep_tilts, args.keep_bon_n)):
        keep = {"vas_rest": rest} if rest else {}
        name, kind = (" keep", "_keep") if rest else ("", "")
        specs += [(f"tilt{name} beta={b:g}", "tilt" + kind,
                   {"vas_model": "positive-dist", "vas_tilt": b, **keep, "vas_top_k": k},
                   dict(k=k, beta=b, tag=f"{b:g}")) for b in tilts]
        specs += [(f"exact-bon{name} N={n}", "exact_bon" + kind,
                   {"vas_model": "positive-dist", "vas_bon_n": n, **keep, "vas_top_k": k},
                   dict(k=k, n=n, tag=str(n), kl_exact_bon=bon_kl(n))) for n in bon_ns]
    return specs


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    t_start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    partial_path = args.out_dir / f"{args.name}.partial.json"
    settings = dict(prompts=args.prompts, max_tokens=args.max_tokens, top_k=args.top_k,
                    seed=args.seed, nmax=max(args.bon_n), format=3)
    state: dict[str, Any] = dict(settings=settings, rows={}, bon_chunks=[], timed={},
                                 sessions=[])
    if partial_path.exists() and not args.fresh:
        saved = json.loads(partial_path.read_text())
        if saved.get("settings") == settings:
            state = saved
            logger.info("resuming from %s: %d methods, %d Best-of-N chunks done", partial_path,
                        len(state["rows"]), len(state["bon_chunks"]))
        else:
            logger.info("ignoring %s: other settings %s", partial_path, saved.get("settings"))

    def save() -> None:
        tmp = partial_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(partial_path)

    P = args.prompts
    specs = method_specs(args)
    # method indices (seeds): Best-of-Nmax 1, Best-of-N timed alone 2 + N, the others 2000 + i
    method_of = {label: 2000 + i for i, (label, *_) in enumerate(specs)}
    nmax = max(args.bon_n)
    chunks = [list(range(i, min(i + args.bon_chunk, P))) for i in range(0, P, args.bon_chunk)]
    todo = ([s for s in specs if s[0] not in state["rows"]]
            + [c for c in chunks if c not in [d["idx"] for d in state["bon_chunks"]]]
            + [n for n in args.bon_timed if str(n) not in state["timed"]])
    run = Runner(args, start_engine=bool(todo))
    for job in tqdm(todo, desc="methods and Best-of-N chunks", unit="job"):
        t0 = time.perf_counter()
        if isinstance(job, tuple):
            label, kind, extra, info = job
            state["rows"][label] = run.single(method_of[label], label, kind, extra, **info)
        elif isinstance(job, list):
            label = f"best-of-{nmax} prompts {job[0]}..{job[-1]}"
            state["bon_chunks"].append(run.best_of_chunk(1, nmax, job))
        else:
            label = f"timed best-of-{job}"
            state["timed"][str(job)] = best_of_timed(run, 2 + job, job)
        save()
        logger.info("%s done in %.1f s", label, time.perf_counter() - t0)
    if todo:
        state["sessions"].append(dict(engine_s=run.engine_s, jobs=len(todo),
                                      s=time.perf_counter() - t_start))
        save()
    rows = [state["rows"][label] for label, *_ in specs]
    checks = [c for r in rows for c in r.pop("checks", [])]
    brows, bon_run = bon_rows(args.bon_n, state["bon_chunks"])
    for r in brows:
        r["wall_timed_s"] = state["timed"].get(str(r["n"]), {}).get("wall_s")
    rows += brows
    timed = state["timed"]
    plain = np.asarray(rows[0]["rewards"])
    summarise(rows, plain, bon_run["rewards_matrix"], P)

    ref_check = check_ref_with_transformers(run.gen, checks) if checks else {}
    for label, c in ref_check.items():
        logger.info("log pi_ref cross-check %s: %s", label, c)
    total = time.perf_counter() - t_start
    title = (f"SmolLM2-135M-Instruct, {P} held-out prompts, T=1, <= {args.max_tokens} tokens, "
             f"k={args.top_k}")
    plots = plot(rows, args.out_dir, args.name, title)
    md = table(rows)
    sanity = rows[0]
    sessions = ", ".join(f"{x['jobs']} jobs in {x['s']:.0f} s" for x in state["sessions"])
    notes = [
        f"{P} held-out prompts, temperature 1.0, top-p 1, <= {args.max_tokens} new tokens, "
        f"VAS k = {args.top_k}; reward vader_positive (prompt + response).",
        f"KL sanity check on plain sampling: {sanity['kl']:+.4f} nats per answer "
        f"(95% CI {sanity['kl_ci'][0]:+.4f}, {sanity['kl_ci'][1]:+.4f}); mean |log pi - log pi_ref| "
        f"per token {sanity['kl_token_abs']:.2e}.",
        "Best-of-N: reward and win rate averaged over all N-subsets of one run's "
        f"Nmax = {max(args.bon_n)} samples per prompt (unbiased); KL = log N - (N-1)/N; cost = "
        "N/Nmax of the Nmax run's generated tokens and wall-clock (generation + reward scoring)"
        + ("; 'timed alone' = its own n=N run." if timed else "."),
        "log pi_ref cross-check against transformers (fp32 forward of the bf16 weights), mean "
        "|difference| per token of vLLM's prompt logprobs / of the processed logprobs: "
        + "; ".join(f"{k} {c['mean_abs_vllm_prompt_logprobs_vs_hf']:.3f} / "
                    f"{c['mean_abs_processed_logprobs_vs_hf']:.3f}" for k, c in ref_check.items())
        + ".",
        f"engine start {run.engine_s:.1f} s; total {total:.1f} s on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        + (f"; resumed: the jobs were done by {len(state['sessions'])} processes ({sessions})."
           if len(state["sessions"]) > 1 else "."),
    ]
    goals = targets(rows)
    notes += [f"target {k}: {'met' if v['met'] else 'NOT met'} ({json.dumps({x: y for x, y in v.items() if x != 'met'})})"
              for k, v in goals.items()]
    md_text = md + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (args.out_dir / f"{args.name}.md").write_text(md_text)
    result = dict(
        prompts=P, max_tokens=args.max_tokens, top_k=args.top_k, seed=args.seed,
        betas=args.betas, bon_n=args.bon_n, bon_model_n=args.bon_model_n,
        reward="vader_positive", generator="SmolLM2-135M-Instruct (bf16)",
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        engine_s=run.engine_s, total_s=total, sessions=state["sessions"], notes=notes,
        ref_check=ref_check,
        bon_run={k: v for k, v in bon_run.items() if k != "rewards_matrix"},
        bon_timed=list(timed.values()),
        rows=rows, plots=[str(p.name) for p in plots], targets=goals,
    )
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + md_text)
    print(f"written {args.out_dir / (args.name + '.json')}, .md and {', '.join(p.name for p in plots)}")
    return result


if __name__ == "__main__":
    main()
