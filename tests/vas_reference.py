"""The slow, obviously-correct VAS reference: full, uncached transformers forwards in fp32.

For a history s (prompt ++ output so far) it computes the generator's logits l, takes the top-k
C, scores every a in C with a full forward of each value model on s ∘ a, and returns
    l'[a] = l[a] + beta * sum_m w_m * (Q_m[a] - mean_C Q_m)   (a in C),   l'[a] = l[a] otherwise
(or -inf outside C when masking): the mean rule, Q a distributional model's mean Σ_b p_b r_b.
With mode "tilt" / "bon" / "threshold" (distributional models) each model adds instead, written
out directly in float64 (exact-tilts.md), without the plugin's code:
    h(x) = Σ_b p_b(x) w_b      w_b = exp(beta w_m r_b) | (C_b^N - C_{b-1}^N) / p_b(prompt) | 1[r_b >= tau]
    l'[a] += e_m T (log h(s∘a) - log h(s))      a in C       (e_m = 1 for the tilt, else w_m)
    l'[a] += e_m T (log h_rest - log h(s))      a not in C,  h_rest = (h(s) - Σ_C pi h) / pi(rest)
with pi = softmax(l / T), h_rest clamped to min_C h when the difference is <= 0 and capped at
max_b w_b. Tests compare vLLM's processed logits with it where a test builds them itself (with
bias and penalties); check_greedy / check_logprobs compare vLLM's tokens and processed logprobs
with the float64 reference of remote_bounded.py, within the float32 error bound of the whole
computation (generator included), and keep no tolerance of their own.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import math

from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from value_models.metadata import VASMetadata
from value_reference import reference_values


class VASReference:
    def __init__(self, generator: Path, value_models: dict[str, Path]) -> None:
        self.paths = (generator, value_models)
        self._bounded = None
        self.gen = AutoModelForCausalLM.from_pretrained(generator, dtype=torch.float32).eval()
        self.values = {
            name: LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in value_models.items()
        }
        self.bins = {name: VASMetadata.load(path).bins for name, path in value_models.items()}

    @torch.no_grad()
    def logits(self, history: Sequence[int]) -> torch.Tensor:
        return self.gen(input_ids=torch.tensor([list(history)])).logits[0, -1].float()  # [V]

    def processed(self, history: Sequence[int], **knobs) -> torch.Tensor:
        return self.reweight(self.logits(history), history, **knobs)

    @torch.no_grad()
    def reweight(
        self, l: torch.Tensor, history: Sequence[int], *, beta: float, top_k: int,
        models: Sequence[str], weights: Sequence[float] | None = None, mask: bool = False,
        mode: str = "mean", bon_n: int | None = None, taus: Sequence[float] | None = None,
        temperature: float = 1.0, prompt_len: int | None = None, rest_keep: bool = False,
    ) -> torch.Tensor:
        """The processed logits for generator logits l [V] at this history (same rules as
        processed_steps; prompt_len is needed by Best-of-N)."""
        cand = l.topk(top_k).indices
        out = l.clone()
        scale = temperature if temperature >= 1e-5 else 1.0
        for j, (name, w) in enumerate(zip(models, weights or [1.0] * len(models))):
            model, bins = self.values[name], self.bins[name]
            if mode == "mean" or bins is None:
                q = reference_values(model, list(history), cand.tolist())           # [K] or [K, O]
                if bins is not None:
                    q = (torch.softmax(q.double(), -1) * torch.tensor(bins, dtype=torch.float64)).sum(-1).float()
                out[cand] += beta * w * (q - q.mean())
                continue
            q = reference_values(model, list(history), cand.tolist()).double()      # [K, O]
            seq = model.score(model.model(input_ids=torch.tensor([list(history)])).last_hidden_state)[0].double()
            out += self._exact_row(
                l.double(), cand, q, seq[-1], seq[(prompt_len or len(history)) - 1] if mode == "bon" else None,
                bins, mode,
                beta * w, bon_n, taus[j] if taus else None, scale, 1.0 if mode == "tilt" else w,
                rest_keep).float()
        if mask:
            keep = out[cand].clone()
            out.fill_(float("-inf"))
            out[cand] = keep
        return out

    @torch.no_grad()
    def processed_steps(
        self, prompt: list[int], tokens: list[int], *, beta: float, top_k: int,
        models: Sequence[str], weights: Sequence[float] | None = None, mask: bool = False,
        mode: str = "mean", bon_n: int | None = None, taus: Sequence[float] | None = None,
        temperature: float = 1.0, rest_keep: bool = False,
    ) -> torch.Tensor:
        """Processed logits before each of `tokens`: [T, V] (the module doc's rules). One causal
        forward gives the generator's logits at every step; every s_t ∘ a is a full forward of
        its own row (right-padded, so the padding is never attended)."""
        T = len(tokens)
        weights = list(weights or [1.0] * len(models))
        ids = torch.tensor([prompt + tokens])
        l = self.gen(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + T].float()  # [T, V]
        cand = l.topk(top_k, dim=-1).indices                                                # [T, K]
        out = l.clone()
        n = torch.arange(T) + len(prompt)                      # len(s_t): position of the candidate
        rows = torch.zeros((T, top_k, int(n.max()) + 1), dtype=torch.long)                 # [T, K, N]
        full = ids[0]
        for t in range(T):
            rows[t, :, :n[t]] = full[:n[t]]
            rows[t, :, n[t]] = cand[t]
        rows = rows.view(T * top_k, -1)
        at = n.repeat_interleave(top_k)                                                     # [T*K]
        scale = temperature if temperature >= 1e-5 else 1.0
        for j, (name, w) in enumerate(zip(models, weights)):
            model, bins = self.values[name], self.bins[name]
            q = torch.cat([
                model.score(model.model(input_ids=rows[i:i + 256]).last_hidden_state[
                    torch.arange(len(rows[i:i + 256])), at[i:i + 256]])
                for i in range(0, len(rows), 256)]).float().view(T, top_k, -1)              # [T, K, O]
            if mode == "mean" or bins is None:
                if bins is not None:
                    q = (torch.softmax(q.double(), -1) * torch.tensor(bins, dtype=torch.float64)).sum(-1)
                else:
                    q = q[..., 0]
                strength = beta * w if mode in ("mean", "bon") else 0.0
                out.scatter_add_(1, cand, (strength * (q - q.mean(-1, keepdim=True))).float())
                continue
            # the value at every prefix s_t (and at the prompt): one causal forward, all positions
            seq = model.score(model.model(input_ids=ids).last_hidden_state)[0].double()    # [P + T, O]
            for t in range(T):
                out[t] += self._exact_row(
                    l[t].double(), cand[t], q[t].double(), seq[n[t] - 1], seq[len(prompt) - 1], bins,
                    mode, beta * w, bon_n, taus[j] if taus else None, scale,
                    1.0 if mode == "tilt" else w, rest_keep).float()
        if mask:
            keep = out.gather(1, cand)
            out = torch.full_like(out, float("-inf")).scatter_(1, cand, keep)
        return out

    @staticmethod
    def _exact_row(l, cand, cand_out, prefix_out, prompt_out, bins, mode, beta, bon_n, tau, scale,
                   power, rest_keep=False) -> torch.Tensor:
        """The shift of one row under an exact rule, in float64 loops: [V]."""
        O = len(bins)

        def probs(logits):
            z = [math.exp(float(x) - float(logits.max())) for x in logits]
            return [v / sum(z) for v in z]

        if mode == "tilt":
            w = [math.exp(beta * r) for r in bins]
        elif mode == "threshold":
            w = [1.0 if r >= tau else 0.0 for r in bins]
        else:  # bon: (C_b^N - C_{b-1}^N) / p_b from the prompt's distribution, written as
            # Σ_j C_b^j C_{b-1}^(N-1-j) (a^N - b^N = (a - b) Σ_j a^j b^(N-1-j), a - b = p_b):
            # no cancellation, and right as p_b -> 0
            p0, c, w = probs(prompt_out), 0.0, []
            for b in range(O):
                prev, c = c, c + p0[b]
                w.append(sum(c ** j * prev ** (bon_n - 1 - j) for j in range(bon_n)))
        h = lambda logits: sum(p * wb for p, wb in zip(probs(logits), w))  # noqa: E731
        h_s = h(prefix_out)
        h_c = [h(cand_out[k]) for k in range(len(cand))]
        pi = torch.softmax(l / scale, -1)
        pi_c = [float(pi[a]) for a in cand]
        rest_mass = 1.0 - sum(pi_c)
        rest = 0.0
        if rest_keep:  # vas_rest "keep": h(s) is the candidates' pi-weighted mean, the rest gets it
            h_s = sum(p * hc for p, hc in zip(pi_c, h_c)) / sum(pi_c)
        elif rest_mass > 1e-6:
            diff = h_s - sum(p * hc for p, hc in zip(pi_c, h_c))
            h_rest = min(diff / rest_mass, max(w)) if diff > 0 else min(h_c)
            rest = power * scale * (math.log(h_rest) - math.log(h_s))
        # every token outside C gets `rest`; written as its equivalent under softmax: the
        # candidates get (their shift - rest) and the others nothing (what the plugin adds)
        shift = torch.zeros_like(l)
        for k, a in enumerate(cand.tolist()):
            shift[a] = power * scale * (math.log(h_c[k]) - math.log(h_s)) - rest
        return shift

    def bounded(self):
        """The float64 reference with float32 error bounds (remote_bounded.py), built once."""
        if self._bounded is None:
            from remote_bounded import RemoteBounded

            self._bounded = RemoteBounded(self.paths[0], self.paths[1])
        return self._bounded

    def check_greedy(self, prompt: list[int], tokens: list[int], **knobs) -> int:
        """Assert every token is the argmax of the processed logits, up to the float32 error
        bound of the computation (remote_bounded.engine_steps: the generator, the value models
        and the rules traced in float64); returns the count of near-ties, steps where the token
        is not the float64 argmax but within that bound of it (float32 may pick either), and
        steps whose top-k or rule branch lies within rounding (then not checked)."""
        from vas_bounded import SLACK

        ties = 0
        knobs = {k: v for k, v in knobs.items() if k != "temperature"}
        for t, step in enumerate(self.bounded().engine_steps(prompt, tokens, temperature=0.0, **knobs)):
            if step.want == 0.0:
                continue   # the token is the float64 argmax
            assert step.ill is not None or step.want <= SLACK * step.bound, (
                f"step {t}: vLLM chose {tokens[t]}, {step.want:.3g} below the reference's processed "
                f"argmax, beyond the float32 error bound {SLACK * step.bound:.3g}; knobs {knobs}")
            ties += 1
        return ties

    def check_logprobs(self, prompt: list[int], tokens: list[int], logprobs: list[float], **knobs) -> int:
        """Assert vLLM's processed logprob of each sampled token equals log_softmax(l' / T) within
        the float32 error bound of the computation (remote_bounded.engine_steps, which also
        takes the engine's ops around VAS: knobs `before` / `after`); steps whose
        top-k or rule branch lies within rounding are not checked (returned: their count), and
        must be at most half."""
        from vas_bounded import SLACK

        steps = self.bounded().engine_steps(prompt, tokens, **knobs)
        for t, (step, lp) in enumerate(zip(steps, logprobs)):
            if step.ill is None:
                assert abs(step.want - lp) <= SLACK * step.bound, (
                    f"step {t}: token {tokens[t]} has processed logprob {lp:.6f} in vLLM, reference "
                    f"{step.want:.6f}, beyond the float32 error bound {SLACK * step.bound:.3g}; knobs {knobs}")
        # a k-th and (k+1)-th logit within rounding of each other leave the top-k undecided (seen
        # at 2 of 12 steps of a k = 8 row): most steps must be checked
        ill = [s.ill for s in steps if s.ill]
        assert len(ill) <= len(steps) // 2, f"{len(ill)} of {len(steps)} steps not checked: {ill}; knobs {knobs}"
        return len(ill)
