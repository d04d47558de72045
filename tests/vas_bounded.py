"""The VAS reference in float64, with a first-order float32 error bound on every processed logit.

VASReference (vas_reference.py) runs the value models in float32, so comparing the plugin with
it needs a tolerance, and a constant one cannot follow the exact rules' conservation step: the
rest's h is h(s) - Σ_C pi h, and that difference amplifies the rounding of its operands by
h(s) / (h(s) - Σ_C pi h). Here the same rules (exact-tilts.md; the module doc of
vas_reference.py) are written as differentiable float64 torch, the value models run in float64
(value_reference.Float64ValueModel), and everything runs under a fp_bounds.RoundingTracer. The
derivative of the processed logit with respect to every op then carries every amplification,
and the bound is derived from the computation, row by row.

What the code under test computes, and so what is charged:
- the value models' forwards in float32 (the runtime's op for op, up to order: SLACK below);
- the rules' float32 steps: log_softmax of the bin logits, Σ_b p_b r_b, logsumexp(log p + log w),
  the mean rule, the final shifts and the add to the logits; knobs and bins are float32 values;
- the conservation step (tilts.exact_shifts) in float64, from float32 inputs (unit U64);
- log pi of the candidates in float64 from the float32 logits both sides share: exact here.

SLACK: the bound is the first-order bound of this computation's algorithm. The runtime computes
the same operations with the same inner lengths, reading cached K/V, but normalises attention by
merging partial softmaxes (flash-decoding): per attention weight one more exp (2 ulps) and two
multiplies, against the 20-ulp exp and the sum charged here, and logs of h in log space. SLACK =
2 allows the runtime up to as large an error again per op (four times the variance).

Branches: the rest's h is clamped when h(s) - Σ_C pi h <= 0 and capped at the largest weight.
Where that decision lies within its own error bound, float32 may take either side, and the value
is not checked: `Expected.ill` says why. Tests count such rows and require them to be few. The
other branches read only the float32 logits both sides share (the top-k, and pi(rest) against
REST_MIN in float64): they are decided the same way on both sides.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fp_bounds import U64, RoundingTracer, assert_within
from value_models.metadata import VASMetadata
from value_reference import RUNTIME_SLACK, Float64ValueModel

SLACK = RUNTIME_SLACK   # the runtime's algorithm against this one's (module doc)
REST_MIN = 1e-6    # exact-tilts: the rest keeps h(s) when pi(rest) is below this (tilts.REST_MIN)


@dataclass
class Expected:
    """One row's processed logits: want [V] float64, bound [V] (0 off the candidates, which
    must be bitwise l or -inf), the candidates [K], and why the row is not checked (or None)."""

    want: torch.Tensor
    bound: torch.Tensor
    cand: torch.Tensor
    ill: str | None = None

    def check(self, got: torch.Tensor, what: str = "") -> None:
        """Assert got [V] (float32) is within SLACK x bound on the candidates (unless ill) and
        equal elsewhere."""
        off = torch.ones_like(got, dtype=torch.bool)
        off[self.cand] = False
        assert torch.equal(got[off].double(), self.want[off]), f"{what}: a token outside the top-k changed"
        if self.ill is None:
            assert_within(got[self.cand], self.want[self.cand], SLACK * self.bound[self.cand], what)


def penalty_round_trip(y: torch.Tensor, repetition: float, frequency: float, presence: float,
                       count: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """P(P^-1(y)) written out (vas_vllm/penalties.py's doc; vLLM's order), float32 as there: the
    identity, whose roundings the V1 adapter adds on top of VAS. The float32 constants fl(1/r),
    fl(f c) and fl(p [c > 0]) are the same on both ways, so only the adds and the multiply or
    divide round. Run it under a RoundingTracer (y: a tracked float64 shadow)."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (float64 under the tracer)
    r = f32(repetition)
    scale_up = torch.where(seen, 1.0 / r, f32(1.0))       # rep(x) = x * fl(1/r) for x > 0
    scale_down = torch.where(seen, r, f32(1.0))           # and x * r otherwise
    fc = f32(frequency) * count.float()
    pm = f32(presence) * (count > 0).float()
    z = (y + fc) + pm
    z = z / torch.where(z > 0, scale_up, scale_down)
    return (z * torch.where(z > 0, scale_up, scale_down) - fc) - pm


def undecided(margins: Sequence[torch.Tensor], bounds: torch.Tensor) -> list[str]:
    """Why branches are not checked: the margins (tracked tensors, one per branch) whose |value|
    lies within SLACK x its float32 bound (bounds: theirs, concatenated in order)."""
    return [f"a branch decided within rounding (margin {m.detach().tolist()}, bound {b.tolist()})"
            for m, b in zip(margins, bounds.split([m.numel() for m in margins]))
            if bool((m.detach().abs() <= SLACK * b).any())]


class BoundedReference:
    def __init__(self, value_models: dict[str, Path]) -> None:
        self.values = {name: Float64ValueModel(path) for name, path in value_models.items()}
        self.bins = {name: VASMetadata.load(path).bins for name, path in value_models.items()}

    def expected(
        self, l: torch.Tensor, history: Sequence[int], *, beta: float, top_k: int,
        models: Sequence[str], weights: Sequence[float] | None = None, mask: bool = False,
        mode: str = "mean", bon_n: int | None = None, taus: Sequence[float] | None = None,
        temperature: float = 1.0, prompt_len: int | None = None, rest_keep: bool = False,
        penalties: tuple | None = None,
    ) -> Expected:
        """The processed logits for generator logits l [V] (float32) at this history, the same
        rules as VASReference.reweight. `penalties` (repetition, frequency, presence, count [V],
        seen [V]): the row goes through the V1 adapter's P^-1 and vLLM's P afterwards."""
        history = list(history)
        cand = l.topk(top_k).indices                                                  # [K]
        cand = cand[l[cand].isfinite()]   # masked by an earlier stage: no part in the rule
        scale = temperature if temperature >= 1e-5 else 1.0
        l64 = l.double()
        cand_logpi = l64[cand] / scale - torch.logsumexp(l64 / scale, -1)            # [K] exact here
        tr = RoundingTracer()
        ill: list[str] = []
        watch: list[torch.Tensor] = []     # branch margins whose sign float32 must get right
        with tr:
            x = self.shifts(tr, history, cand, cand_logpi, beta=beta, models=models, weights=weights,
                            mode=mode, bon_n=bon_n, taus=taus, scale=scale, prompt_len=prompt_len,
                            rest_keep=rest_keep, watch=watch)
            out_c = l64[cand] + x                                                    # [K]
            if penalties is not None:
                rep, freq, pres, count, seen = penalties
                out_c = penalty_round_trip(out_c, rep, freq, pres, count[cand], seen[cand])
        bound = tr.bound(torch.cat([out_c, *watch]))
        ill += undecided(watch, bound[len(cand):])
        want = torch.full_like(l64, float("-inf")) if mask else l64.clone()
        want[cand] = out_c.detach()
        full = torch.zeros_like(l64)
        full[cand] = bound[:len(cand)]
        return Expected(want, full, cand, "; ".join(ill) or None)

    def shifts(self, tr: RoundingTracer, history: list[int], cand: torch.Tensor, cand_logpi: torch.Tensor, *,
               beta: float, models: Sequence[str], weights: Sequence[float] | None = None,
               mode: str = "mean", bon_n: int | None = None, taus: Sequence[float] | None = None,
               scale: float = 1.0, prompt_len: int | None = None, rest_keep: bool = False,
               watch: list[torch.Tensor]) -> torch.Tensor:
        """delta - rest [K] for the candidates (float32, as reweight.combine returns them), run
        inside `tr`. cand_logpi [K]: log pi_T of the candidates, exact (a plain float64 tensor)
        or tracked with the error of where it came from (a server's log-probabilities). Branch
        margins go to `watch`."""
        delta = rest = None
        for j, (name, w) in enumerate(zip(models, weights or [1.0] * len(models))):
            net, bins = self.values[name], self.bins[name]
            (z_s, z_p), cache = net.prefix(history, [-1, (prompt_len or len(history)) - 1])  # [O] x 2
            z = net.candidates(cache, len(history), cand.tolist())                   # [K, O]
            if mode == "mean" or bins is None:
                shift = self._mean_rule(tr, z, bins, beta * w if mode in ("mean", "bon") else 0.0)
                r = None
            else:
                shift, r = self._exact(
                    tr, z, z_s, z_p, bins, mode, beta * w,
                    bon_n, taus[j] if taus else None, scale, 1.0 if mode == "tilt" else w,
                    cand_logpi, rest_keep, watch)
            delta = shift if delta is None else delta + shift
            if r is not None:
                rest = r if rest is None else rest + r
        return delta if rest is None else delta - rest

    @staticmethod
    def _mean_rule(tr: RoundingTracer, z: torch.Tensor, bins: list[float] | None, strength: float) -> torch.Tensor:
        """strength * (q - mean_C q): q the scalar head, or Σ_b p_b r_b (p_b as exp(log p_b): the
        form the code under test evaluates, so its roundings are the ones charged)."""
        q = z[:, 0] if bins is None else (torch.log_softmax(z, -1).exp() * tr.rounded(bins)).sum(-1)
        return tr.rounded(strength) * (q - q.sum() / len(q))

    @staticmethod
    def _exact(tr, z, z_s, z_p, bins, mode, beta, bon_n, tau, scale, power, cand_logpi, rest_keep,
               watch) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate shifts [K], rest shift []) under an exact rule (exact-tilts.md), with
        h(x) = Σ_b p_b(x) w_b taken in log space: log h = logsumexp(log p + log w)."""
        r = torch.tensor(bins, dtype=torch.float64)
        if mode == "tilt":
            log_w = tr.rounded(beta) * tr.rounded(r)                                 # [O]
        elif mode == "threshold":
            log_w = torch.where(r >= tau, 0.0, float("-inf"))
        else:  # bon: (C_b^N - C_{b-1}^N) / p_b = Σ_j C_b^j C_{b-1}^(N-1-j), C the prompt's CDF
            lp0 = torch.log_softmax(z_p, -1)                                         # [O] (float32)
            with tr.unit(U64):   # the weights are computed in float64 from float32 log p
                c = torch.cumsum(lp0.exp(), -1)
                c = c / c[-1]
                prev = torch.cat([c.new_zeros(1), c[:-1]])
                w_b = sum(c ** i * prev ** (bon_n - 1 - i) for i in range(bon_n))
                log_w = torch.log(w_b)
            log_w = tr.rounded(log_w)                                                # stored float32
        lh_c = torch.logsumexp(torch.log_softmax(z, -1) + log_w, -1)                 # [K]: log h(s∘a)
        lh_s = torch.logsumexp(torch.log_softmax(z_s, -1) + log_w, -1)               # []: log h(s)
        log_w_max = log_w.max()
        with tr.unit(U64):   # tilts.exact_shifts runs in float64
            pi_c = cand_logpi.exp()
            pi_rest = 1.0 - pi_c.sum()   # tracked when cand_logpi is (a server's log-probabilities)
            sum_c = (pi_c * lh_c.exp()).sum()                                        # Σ_C pi h
            if rest_keep:    # h(s) := Σ_C pi h / pi(C); the rest gets it
                lh_s = torch.log(sum_c / pi_c.sum())
                log_rest = lh_s
            elif float(pi_rest.detach()) <= REST_MIN:
                log_rest = lh_s                                                      # shift 0
            else:
                diff = lh_s.exp() - sum_c                                            # Σ_rest pi h
                watch.append(diff.reshape(1))
                if diff > 0:
                    log_rest = torch.log(diff / pi_rest)
                    watch.append((log_rest - log_w_max).reshape(1))
                    log_rest = torch.minimum(log_rest, log_w_max)                    # h <= max w
                else:
                    log_rest = lh_c.min()                                            # clamped
            cand_shift, rest_shift = lh_c - lh_s, log_rest - lh_s
        p = tr.rounded(power) * tr.rounded(scale)
        return p * tr.rounded(cand_shift), p * tr.rounded(rest_shift)


