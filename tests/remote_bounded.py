"""Remote VAS's step tables in float64, with a first-order float32 error bound on each entry.

A remote step (vas_vllm/remote/stepper.py) starts from the server's float32 log-probabilities of
the top-k, log_softmax(l) (vLLM's raw_logprobs) or log_softmax(l / T) (processed_logprobs), adds
the plugin's shifts and normalises over the top-k and the rest (steps.step_table, float64):

    log p(a)    = lp(a) + (delta(a) - rest) / T - log Z     a in C
    log p(rest) = log(1 - Σ_C exp lp)           - log Z     (-inf under vas_mask_outside_top_k)

so its error has three sources, and a constant tolerance follows none of them: the generator's
float32 forward on the server (l ~ 25 here, from random weights of std 0.5), the value models'
float32 forwards and the rules (vas_bounded.BoundedReference), and the amplification of the
first by the rest's 1 - Σ_C pi (by pi(C) / pi(rest)) and, under an exact rule, by the
conservation step that gives the rest its share. Here the generator runs in float64 under the
same fp_bounds.RoundingTracer as the value models and the rules, with the server's log-softmax
and the table as float32 and float64 ops, so the derivative of every table entry with respect
to every rounding carries each amplification.

The plugin's processed log-probabilities (vLLM's processed_logprobs with the plugin in the
engine: log_softmax((l + delta - rest on C, l elsewhere) / T) in float32) come out of the same
trace: `Tables.plugin`. `engine_steps` does the same for a whole sampled or greedy sequence of
the in-engine plugin (one traced forward of the generator over it, as vLLM's prefill): the
processed log-probability of each token, or for greedy the gap to the processed argmax.

Charged as the code under test computes, up to these stated differences (all conservative or
covered by SLACK, vas_bounded's module doc):
- the server's forward is one causal forward here (vLLM runs the prompt as a prefill and each
  generated token as a one-token decode over cached K/V: the same ops with the same inner
  lengths, in another order);
- delta - rest is charged one float32 subtraction (the remote subtracts in float64).

The server's top-k is taken as given (the candidates of the step's table). It must be the top-k
of the float64 logits, unless the k-th and the (k+1)-th are within rounding of each other: such a
step is `ill` and not checked; tests count them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fp_bounds import U64, RoundingTracer, assert_within, watch
from vas_bounded import SLACK, BoundedReference, undecided

NEG_INF = float("-inf")


@dataclass
class Tables:
    """One step: the remote table and the plugin's processed log-probabilities, float64 with
    their bounds. remote [K + 1] (the rest last), plugin [K] (its top-k; the rest's mass the
    test takes as 1 - Σ is not bounded here), and why the step is not checked (or None)."""

    remote: torch.Tensor
    remote_bound: torch.Tensor
    plugin: torch.Tensor
    plugin_bound: torch.Tensor
    ill: str | None = None

    def check_remote(self, log_p: Sequence[float], what: str = "") -> None:
        if self.ill is None:
            assert_within(torch.tensor(list(log_p), dtype=torch.float64), self.remote,
                          SLACK * self.remote_bound, what)

    def check_plugin(self, log_p: Sequence[float], what: str = "") -> None:
        if self.ill is None:
            assert_within(torch.tensor(list(log_p), dtype=torch.float64), self.plugin,
                          SLACK * self.plugin_bound, what)


class Float64Generator:
    """A float64 copy of the saved generator whose forward, run under a RoundingTracer, records
    what a float32 run makes: the logits at the last position of a history [V]."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float64, attn_implementation="eager").eval()
        watch(self.model)

    def last_logits(self, history: list[int]) -> torch.Tensor:
        hidden = self.model.model(input_ids=torch.tensor([history])).last_hidden_state[0, -1]  # [Hid]
        return self.model.lm_head(hidden)                                                   # [V]


class RemoteBounded:
    def __init__(self, generator: Path, value_models: dict[str, Path]) -> None:
        self.gen = Float64Generator(generator)
        self.rules = BoundedReference(value_models)

    def tables(self, history: Sequence[int], cand: Sequence[int], *, processed: bool, temperature: float,
               beta: float, top_k: int, models: Sequence[str], weights: Sequence[float] | None = None,
               mask: bool = False, mode: str = "mean", bon_n: int | None = None,
               taus: Sequence[float] | None = None, prompt_len: int | None = None) -> Tables:
        """The step before history's next token, with the server's top-k `cand` (K = top_k).
        processed: the server sends log_softmax(l / T); otherwise log_softmax(l), and the remote
        divides it by T (stepper's lp_scale). The other knobs as VASReference.processed_steps."""
        history, K = list(history), len(cand)
        assert K == top_k, (K, top_k)
        T = temperature if temperature >= 1e-5 else 1.0
        idx = torch.tensor(list(cand))
        in_c = torch.zeros(self.rules_vocab(), dtype=torch.bool)
        in_c[idx] = True
        tr = RoundingTracer()
        margins: list[torch.Tensor] = []
        with tr:
            l = self.gen.last_logits(history)                                        # [V] float32
            # the server's top-k must be the top-k: min over C minus max outside, >= 0
            margins.append((l[idx].min() - l[~in_c].max()).reshape(1))
            if processed:
                lp = torch.log_softmax(l / T, -1)[idx]                               # [K] float32
            else:
                lp = torch.log_softmax(l, -1)[idx]
                if T != 1.0:
                    with tr.unit(U64):
                        lp = lp / T                                                  # stepper: / lp_scale
            x = self.rules.shifts(tr, history, idx, lp, beta=beta, models=models, weights=weights,
                                  mode=mode, bon_n=bon_n, taus=taus, scale=T, prompt_len=prompt_len,
                                  rest_keep=False, watch=margins)                    # [K] float32
            with tr.unit(U64):   # steps.step_table
                cand_col = lp + x / T
                if mask:
                    remote = cand_col - torch.logsumexp(cand_col, -1)
                else:   # the rest's mass, 1 - Σ_C pi: -inf where the rounded lp leave none
                    mass = 1.0 - lp.exp().sum()
                    rest_col = torch.log(mass) if float(mass.detach()) > 0 else mass.new_full((), NEG_INF)
                    table = torch.cat([cand_col, rest_col.reshape(1)])
                    remote = table - torch.logsumexp(table, -1)                     # [K + 1]
            placed = torch.zeros_like(l)   # the plugin: l + shift on the top-k, l elsewhere
            placed[idx] = l[idx] + x
            processed_l = torch.where(in_c, placed, l)
            if mask:
                processed_l = torch.where(in_c, processed_l, NEG_INF)
            plugin = torch.log_softmax(processed_l / T, -1)[idx]                     # [K] float32
        n_out = remote.numel() + plugin.numel()
        bound = tr.bound(torch.cat([remote, plugin, *margins]))
        ill = undecided(margins, bound[n_out:])
        if float(margins[0].detach()) < 0 and not ill:
            raise AssertionError(f"the server's top-k {list(cand)} is not the top-{K} of the float64 "
                                 f"logits (margin {float(margins[0].detach()):.3g} beyond rounding)")
        remote_out = remote.detach()
        if mask:
            remote_out = torch.cat([remote_out, torch.tensor([NEG_INF], dtype=torch.float64)])
            remote_bound = torch.cat([bound[:K], torch.zeros(1, dtype=torch.float64)])
        else:
            remote_bound = bound[:K + 1]
        return Tables(remote_out, remote_bound, plugin.detach(), bound[remote.numel():n_out],
                      "; ".join(ill) or None)

    def rules_vocab(self) -> int:
        return self.gen.model.config.vocab_size

    def engine_steps(self, prompt: Sequence[int], tokens: Sequence[int], *, top_k: int | None = None,
                     temperature: float = 1.0, mask: bool = False,
                     before: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                     after: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                     **knobs) -> list[EngineStep]:
        """The in-engine plugin along `tokens`: for each step, float64 and bound of the processed
        log-probability of the token (sampled rows, T > 0) or of the processed argmax's margin
        over it (greedy rows: 0 where the token is the argmax). knobs: BoundedReference.shifts'
        (beta, models, weights, mode, bon_n, taus, rest_keep); no `models`: a row without VAS.
        What the engine does around VAS, as traced ops of step t: before(l, t), on the
        generator's logits before VAS (logit_bias, min_tokens, penalties), and after(l', in_c, t)
        on the re-weighted logits, in_c the top-k mask (the V1 adapter's penalty round trip)."""
        prompt, tokens = list(prompt), list(tokens)
        greedy = temperature < 1e-5
        T = 1.0 if greedy else temperature
        knobs.setdefault("rest_keep", False)
        tr = RoundingTracer()
        outs: list[torch.Tensor] = []
        margins: list[list[torch.Tensor]] = []
        with tr:
            hidden = self.gen.model.model(input_ids=torch.tensor([prompt + tokens])).last_hidden_state[0]
            for t, token in enumerate(tokens):
                l = self.gen.model.lm_head(hidden[len(prompt) - 1 + t])                 # [V] float32
                if before is not None:
                    l = before(l, t)
                watch_t: list[torch.Tensor] = []
                proc = l
                if knobs.get("models"):
                    idx = l.detach().topk(top_k).indices
                    in_c = torch.zeros(l.shape[0], dtype=torch.bool)
                    in_c[idx] = True
                    watch_t.append((l[idx].min() - l[~in_c].max()).reshape(1))   # the top-k is the top-k
                    with tr.unit(U64):   # the plugin's log pi of the candidates, float64 from float32 l
                        cand_logpi = l[idx] / T - torch.logsumexp(l / T, -1)
                    x = self.rules.shifts(tr, prompt + tokens[:t], idx, cand_logpi, scale=T,
                                          prompt_len=len(prompt), watch=watch_t, **knobs)
                    placed = torch.zeros_like(l)
                    placed[idx] = l[idx] + x
                    proc = torch.where(in_c, placed, l)
                    if mask:
                        proc = torch.where(in_c, proc, NEG_INF)
                else:
                    in_c = torch.zeros(l.shape[0], dtype=torch.bool)
                if after is not None:
                    proc = after(proc, in_c, t)
                if greedy:
                    best = int(proc.detach().argmax())
                    outs.append((proc[best] - proc[token]).reshape(1))
                else:
                    outs.append(torch.log_softmax(proc / T, -1)[token].reshape(1))  # float32 in vLLM
                margins.append(watch_t)

        def resolve(out: torch.Tensor, ms: list[torch.Tensor]) -> tuple[float, str | None]:
            # one bound per step: a backward pass from this step's outputs only reaches its own
            # ops and the part of the generator's forward they depend on (all steps at once would
            # run every step's vocabulary-wide ops in every pass)
            bound = tr.bound(torch.cat([out, *ms]))
            return float(bound[0]), "; ".join(undecided(ms, bound[1:])) or None

        return [EngineStep(float(out.detach()), lambda out=out, ms=ms: resolve(out, ms))
                for out, ms in zip(outs, margins)]


class EngineStep:
    """One step of `engine_steps`: the float64 value; its float32 error bound and why the step
    is not checked (or None) are computed on first use (a backward pass per step), so a greedy
    check pays for them only at steps where the token is not the float64 argmax."""

    def __init__(self, want: float, resolve: Callable[[], tuple[float, str | None]]) -> None:
        self.want = want
        self._resolve = resolve

    @cached_property
    def _resolved(self) -> tuple[float, str | None]:
        return self._resolve()

    @property
    def bound(self) -> float:
        return self._resolved[0]

    @property
    def ill(self) -> str | None:
        return self._resolved[1]
