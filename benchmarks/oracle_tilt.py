"""Is it the rule or the value model? Exact tilts with h estimated by Monte Carlo rollouts.

    python -m benchmarks.oracle_tilt --prompts 8 --bon-n 4 --rollouts 16 --top-k 8
    python -m benchmarks.oracle_tilt --quick            # 2 prompts, 6 tokens: a smoke test

The plugin's exact rules (vas_vllm/tilts.py) need h(s∘a) = E[w(R) | s∘a] under pi_ref for the
top-k candidates a. Here h comes from no value model at all: at every step, every candidate is
continued M times by the frozen generator itself (vLLM, plain sampling to the answer's end) and
h(s∘a) is the mean of w over those rollouts' rewards; h(s) is the chosen candidate's estimate
from the step before (as the plugin keeps the committed candidate's value), and at the prompt the
mean over its own rollouts, which also give Best-of-N's CDF F_x (their empirical CDF, ties by the
bin average of tilts.py). The token is drawn from exactly the plugin's distribution
(tilts.exact_shifts: candidates, and the rest by conservation; a draw in the rest is a vLLM
sample with the candidates masked), and the KL is sum_t log q(y_t) - log pi_ref(y_t).

So the same rule with (noisy but unbiased) Monte Carlo values in place of the value model: if it
lands near Best-of-N's reward at near its KL while the value model does not, the value model's
accuracy is what limits the plugin, not the rule. Writes <out-dir>/oracle_tilt.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.quality_stats import best_of_n, bon_kl, mean_ci

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.oracle_tilt")


def bon_weight(r: np.ndarray, reference: np.ndarray, n: int) -> np.ndarray:
    """Best-of-N weight of rewards r under the empirical distribution `reference` (tilts.py's
    bin average: (F(r)^N - F(r-)^N) / (F(r) - F(r-)), or N F(r)^(N-1) between samples)."""
    ref = np.sort(reference)
    hi = np.searchsorted(ref, r, side="right") / ref.size                      # F(r)
    lo = np.searchsorted(ref, r, side="left") / ref.size                       # F(r-)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(hi > lo, (hi ** n - lo ** n) / (hi - lo), n * hi ** (n - 1))
    return w


class Oracle:
    def __init__(self, args: argparse.Namespace) -> None:
        from vas_vllm.local_engine import in_process_engine_kwargs

        layout = in_process_engine_kwargs()
        from transformers import AutoTokenizer
        from vllm import LLM

        from value_models import embedded
        from value_models.training.prompts import heldout_prompts
        from value_models.training.rewards import parse_reward

        self.args = args
        gen = embedded.build_smollm2("bfloat16")
        self.tok = AutoTokenizer.from_pretrained(gen)
        self.reward = parse_reward("vader_positive")
        self.prompts = heldout_prompts(args.prompts)
        self.llm = LLM(model=str(gen), dtype="bfloat16", max_model_len=256, seed=args.seed,
                       max_num_seqs=512, kv_cache_memory_bytes=1 << 30, enforce_eager=True,
                       max_num_batched_tokens=16384, **layout)
        self.calls = 0

    def _generate(self, ids: list[list[int]], params: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        self.calls += 1
        return self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)

    def score(self, prompt: str, response_ids: list[list[int]]) -> np.ndarray:
        texts = self.tok.batch_decode(response_ids, skip_special_tokens=True)
        return np.asarray(self.reward.score([prompt] * len(texts), texts), dtype=np.float64)

    def rollouts(self, jobs: list[tuple[int, list[int], int]], m: int, seed: int) -> list[np.ndarray]:
        """For each job (prompt index, response so far, tokens left): rewards of m continuations."""
        from vllm import SamplingParams

        out: list[np.ndarray | None] = [None] * len(jobs)
        live = [j for j, (_, resp, left) in enumerate(jobs)
                if left > 0 and (not resp or resp[-1] != self.tok.eos_token_id)]
        for j, (p, resp, _) in enumerate(jobs):  # finished texts: their own reward, m times
            if j not in live:
                out[j] = np.repeat(self.score(self.prompts[p], [resp]), m)
        if live:
            ids = [self.prompt_ids[jobs[j][0]] + jobs[j][1] for j in live]
            params = [SamplingParams(n=m, temperature=1.0, top_p=1.0, max_tokens=jobs[j][2],
                                     seed=seed + 7919 * i) for i, j in enumerate(live)]
            for j, o in zip(live, self._generate(ids, params)):
                p, resp, _ = jobs[j]
                out[j] = self.score(self.prompts[p], [resp + list(c.token_ids) for c in o.outputs])
        return out  # type: ignore[return-value]

    def next_tokens(self, states: list[list[int]], k: int) -> list[dict[int, float]]:
        """log pi_ref of the top-k next tokens after prompt + each response (raw logprobs)."""
        from vllm import SamplingParams

        outs = self._generate(states, [SamplingParams(max_tokens=1, logprobs=k, temperature=1.0)] * len(states))
        tops = []
        for o in outs:
            d = o.outputs[0].logprobs[0]
            tops.append({t: lp.logprob for t, lp in sorted(d.items(), key=lambda kv: kv[1].rank)[:k]})
        return tops

    def draw_rest(self, state: list[int], masked: list[int], seed: int) -> tuple[int, float]:
        """A token from pi_ref restricted to the vocabulary outside `masked`: (id, log pi_ref)."""
        from vllm import SamplingParams

        (o,) = self._generate([state], [SamplingParams(
            max_tokens=1, temperature=1.0, seed=seed, logprobs=0,
            logit_bias={t: -100.0 for t in masked})])
        c = o.outputs[0]
        return c.token_ids[0], c.logprobs[0][c.token_ids[0]].logprob

    def decode(self, rule: str, value: float) -> dict[str, Any]:
        from vas_vllm import tilts

        a, T, k, M = self.args, self.args.max_tokens, self.args.top_k, self.args.rollouts
        P = len(self.prompts)
        self.prompt_ids = [self.tok(p)["input_ids"] for p in self.prompts]
        rng = np.random.default_rng(a.seed)
        base = self.rollouts([(p, [], T) for p in range(P)], a.cdf_samples, seed=a.seed)   # [P][m]

        def weight(p: int, r: np.ndarray) -> np.ndarray:
            return bon_weight(r, base[p], int(value)) if rule == "bon" else np.exp(value * r)

        # the largest weight: N for Best-of-N, exp(beta r_max) for the tilt (VADER: r <= 1)
        log_w_max = [math.log(float(value)) if rule == "bon" else value * 1.0 for p in range(P)]
        resp: list[list[int]] = [[] for _ in range(P)]
        h_prev = [float(weight(p, base[p]).mean()) for p in range(P)]
        kl, clamps, done = np.zeros(P), 0, [False] * P
        for t in range(T):
            live = [p for p in range(P) if not done[p]]
            if not live:
                break
            tops = self.next_tokens([self.prompt_ids[p] + resp[p] for p in live], k)
            jobs = [(p, resp[p] + [c], T - t - 1) for p, top in zip(live, tops) for c in top]
            rewards = self.rollouts(jobs, M, seed=a.seed + 1000 * (t + 1))
            at = 0
            for p, top in zip(live, tops):
                cands = list(top)
                h = np.array([weight(p, rewards[at + i]).mean() for i in range(len(cands))])
                at += len(cands)
                lpi = torch.tensor([top[c] for c in cands], dtype=torch.float64)[None]
                with np.errstate(divide="ignore"):
                    lh = torch.tensor(np.log(h))[None]
                shift, rest, clamped = tilts.exact_shifts(
                    lpi, torch.ones_like(lpi, dtype=torch.bool), lh,
                    torch.tensor([math.log(max(h_prev[p], 1e-300))]), torch.tensor([log_w_max[p]]),
                    torch.tensor([a.rest == "keep"]))
                clamps += int(clamped[0])
                s = shift[0].double().numpy()
                log_rest_pi = math.log(max(1.0 - float(lpi.exp().sum()), 1e-300))
                logits = np.append(lpi[0].numpy() + s, log_rest_pi + float(rest[0]))   # [K + 1]
                q = np.exp(logits - logits.max())
                q /= q.sum()
                j = int(rng.choice(len(q), p=q))
                if j < len(cands):
                    tok, lp_ref, lq = cands[j], float(lpi[0, j]), math.log(q[j])
                    h_prev[p] = float(h[j])
                else:  # the rest: pi_ref restricted to it, times the rest's guided mass
                    tok, lp_ref = self.draw_rest(self.prompt_ids[p] + resp[p], cands, seed=a.seed + t * 131 + p)
                    lq = math.log(q[-1]) + lp_ref - log_rest_pi
                    h_prev[p] = float(weight(p, self.rollouts([(p, resp[p] + [tok], T - t - 1)], M,
                                                              seed=a.seed + 17 * t + p)[0]).mean())
                kl[p] += lq - lp_ref
                resp[p].append(tok)
                done[p] = tok == self.tok.eos_token_id
        rewards = np.array([float(self.score(self.prompts[p], [resp[p]])[0]) for p in range(P)])
        m, lo, hi = mean_ci(rewards)
        return dict(rule=rule, value=value, reward=m, reward_ci=[lo, hi], kl=float(kl.mean()),
                    kl_per_prompt=kl.tolist(), rewards=rewards.tolist(), rest_clamps=clamps,
                    kl_exact_bon=bon_kl(int(value)) if rule == "bon" else None,
                    # Best-of-N on the same prompts and length, from the prompt's own samples
                    bon_reward=(float(best_of_n(np.array([np.asarray(base[p]) for p in range(P)]),
                                                int(value)).mean()) if rule == "bon" else None),
                    plain_reward=float(np.mean([np.mean(base[p]) for p in range(P)])),
                    texts=self.tok.batch_decode(resp[:4], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (the quality run's first)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--bon-n", type=int, nargs="*", default=[4], help="exact Best-of-N sizes")
    p.add_argument("--tilts", type=float, nargs="*", default=[], help="exact tilt strengths")
    p.add_argument("--top-k", type=int, default=8, help="candidates per step")
    p.add_argument("--rollouts", type=int, default=16, help="continuations per candidate (M)")
    p.add_argument("--cdf-samples", type=int, default=128, help="samples of the prompt for F_x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 prompts, 6 tokens, M 4, k 4")
    p.add_argument("--rest", choices=["conserve", "keep"], default="conserve",
                   help="the rest's h: by conservation, or the candidates' mean (vas_rest)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens, args.rollouts, args.top_k, args.cdf_samples = 2, 6, 4, 4, 16
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    oracle = Oracle(args)
    rows = []
    for rule, values in (("bon", args.bon_n), ("tilt", args.tilts)):
        for v in values:
            t1 = time.perf_counter()
            rows.append({**oracle.decode(rule, v), "wall_s": time.perf_counter() - t1})
            logger.info("%s %g: reward %.3f, KL %.2f (%.0f s)", rule, v, rows[-1]["reward"],
                        rows[-1]["kl"], rows[-1]["wall_s"])
    result = dict(prompts=args.prompts, max_tokens=args.max_tokens, top_k=args.top_k, rest=args.rest,
                  rollouts=args.rollouts, cdf_samples=args.cdf_samples, seed=args.seed,
                  rows=rows, generate_calls=oracle.calls, total_s=time.perf_counter() - t0,
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = ("oracle_tilt_quick" if args.quick else "oracle_tilt") + ("_keep" if args.rest == "keep" else "")
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"{r['rule']} {r['value']:g}: reward {r['reward']:+.3f} [{r['reward_ci'][0]:+.3f}, "
              f"{r['reward_ci'][1]:+.3f}], KL {r['kl']:.2f}"
              + (f" (exact Best-of-N: {r['kl_exact_bon']:.2f}; its reward on these prompts "
                 f"{r['bon_reward']:+.3f})" if r["kl_exact_bon"] else "")
              + f"; plain {r['plain_reward']:+.3f}")
    return result


if __name__ == "__main__":
    main()
