"""First-order float32 rounding-error bounds by automatic differentiation (Linnainmaa's formula).

A test that compares a float32 computation f with a reference needs a tolerance. Rather than a
constant tuned on one machine, run the reference in float64 under `RoundingTracer`: every torch
op whose result autograd tracks is recorded with the rounding errors float32 arithmetic would
make in it (Higham's standard model: fl(x op y) = (x op y)(1 + d), |d| <= u = 2^-24). To first
order the float32 result is f + Σ_k c_k d_k, summed over every single rounding k, with c_k the
derivative of f with respect to that op's output times the rounded quantity, so

    |f32 - f| <= Σ_ops Σ_elements |∂f/∂y_op| * e_op                  (Linnainmaa 1976)

and autograd gives every ∂f/∂y_op in one backward pass per output element. Condition numbers
need no special case: the conservation step of an exact tilt, log(h(s) - Σ_C pi h), amplifies
its operands' errors by h(s) / (h(s) - Σ_C pi h), and that factor is in the derivative.

Two bounds come out of one pass (`bounds`):
- worst case: every rounding at its extreme, |d_k| = u, with the same sign as c_k. Rigorous to
  first order (for a dot product of length n, about gamma_n Σ|a b|: Higham, Accuracy and
  Stability of Numerical Algorithms, 2nd ed., §3.1), but 1e3-1e4 times the error one observes
  on a small transformer: too loose to catch an O(1e-2) bug.
- probabilistic (what the tests use): Higham & Mary, "A new approach to probabilistic rounding
  error analysis", SIAM J. Sci. Comput. 41 (2019): model the roundings d_k of + - * / sqrt as
  independent, mean-zero and bounded by u. By Hoeffding's inequality
      P(|Σ_k c_k d_k| >= LAMBDA * u * sqrt(Σ_k c_k^2)) <= 2 exp(-LAMBDA^2 / 2)
  (2.5e-14 at LAMBDA = 8, per checked element). A dot product of length n is n products and
  n - 1 additions, each the sum of a subset of the terms a_k b_k, so each is at most
  S = max(Σ of the positive terms, Σ |negative terms|): it contributes at most n (u S)^2 to the
  variance, for any summation order or blocking, hence whatever kernel, thread count or CPU
  capability runs it. Errors that need not be random (the polynomial approximations inside exp,
  log, ...) stay in their worst case and add linearly. The bound is the smaller of the two.

Local errors: fp_rules.py (the rule for each op, and where each constant comes from). An op
without a rule raises NotImplementedError: nothing is silently taken as exact.

Only ops whose result requires grad are recorded: inputs whose values are exact (weights stored
in float32, token ids, logits handed to both sides) are exact here too, and `watch` marks the
tensors whose downstream rounding counts. Make those float64 shadows before entering the tracer.

Dtypes: every tensor computes in float64 here, but the tracer keeps the dtype it has in the code
under test (its "real" dtype: float32 unless declared, or set by a cast or a dtype= argument) and
charges each op the unit of that dtype (torch's type promotion). `x.dtype` reads the real dtype,
so code such as HF's LlamaRMSNorm (`.to(torch.float32)` ... `.to(input_dtype)`) means there what
it means in float32. Casts are carried out in float64 and cost one rounding where they narrow a
tracked value (float64 to float32). The default dtype is float64 while tracing. Code that a test
models rather than runs (vas_bounded's rules) can force a unit for a stage with `tracer.unit`;
a value stored in float32 before use (a reward bin, a Python float knob) enters through
`tracer.rounded`.

Both bounds are first order: they leave out O(u^2) terms, ~1e-14 relative here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fp_rules import (  # noqa: F401  (the constants are part of this module's API)
    BATCH_ELEMENTS, CASTS, EXACT_IN_PLACE, EXACT_OPS, IN_PLACE_OPS, LAMBDA, LOW_DTYPES, MATMUL_OPS,
    ROUNDED_OPS, ROUNDINGS, SOFTMAX_EXP_ULPS, TINY, TRANSCENDENTAL_OPS, TRANSCENDENTAL_ULPS, U32, U64,
    UNITS, dead_branch_grad, flat, float64_dtype, gamma, hook_dead_branches, subset_sum_bound,
)


def watch(*items: torch.nn.Module | torch.Tensor) -> None:
    """Track what a traced computation starts from: tensors given require grad; for a module,
    its floating buffers (a rotary table's inverse frequencies) do, and its embeddings' outputs
    become tracked leaves. Parameters stay untracked: they are exact inputs, and tracking them
    would only make every backward pass compute their gradients (a whole vocabulary's worth)."""
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and not item.requires_grad:
                item.requires_grad_(True)
            continue
        for t in item.buffers():
            if t.is_floating_point():
                t.requires_grad_(True)
        for mod in item.modules():
            if isinstance(mod, torch.nn.Embedding):
                mod.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))


class RoundingTracer(TorchFunctionMode):
    """Record the rounding errors of every tracked op run inside `with tracer:` (module doc)."""

    def __init__(self, default: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.default = default        # the real dtype of a floating tensor nobody declared
        self.u = UNITS[default]       # the unit of the op being recorded
        self._forced: float | None = None
        # (y, k, size, rel, u): y's k roundings of magnitude <= size at unit u (random, in the
        # probabilistic bound) and a library function's error rel |y| (always worst case)
        self.records: list[tuple[torch.Tensor, int, torch.Tensor | None, float, float]] = []
        self._recorded: set[int] = set()   # ids of the recorded tensors
        self._saved: tuple[torch.dtype, int] = (torch.float32, 1)

    # ---- context -------------------------------------------------------------------------
    def __enter__(self) -> "RoundingTracer":
        # The traced ops are small and run one after another: OpenMP threads only add barrier
        # waits (stalls, on a machine busy with other work). The code under test runs outside.
        self._saved = (torch.get_default_dtype(), torch.get_num_threads())
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.set_default_dtype(self._saved[0])
        torch.set_num_threads(self._saved[1])

    @contextlib.contextmanager
    def unit(self, u: float) -> Iterator[None]:
        """Ops inside run at unit roundoff u, whatever their dtypes (U64 for a stage the code
        under test runs in float64, 0 for an exact one)."""
        old, self._forced = self._forced, u
        try:
            yield
        finally:
            self._forced = old

    def real(self, t: torch.Tensor) -> torch.dtype:
        """The dtype t has in the code under test (its float64 shadow's is always float64)."""
        return getattr(t, "_fpb_real", None) or (self.default if t.is_floating_point() else t.dtype)

    @staticmethod
    def declare(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Say that t is a `dtype` tensor in the code under test (default: the tracer's)."""
        t._fpb_real = dtype
        return t

    def rounded(self, x: torch.Tensor | float | Sequence[float], u: float | None = None) -> torch.Tensor:
        """x as the code under test holds it after storing it in float32 (or at unit u): one
        more rounding of size u |x|. A tracked x keeps its graph; anything else becomes a
        tracked float64 leaf."""
        if isinstance(x, torch.Tensor) and x.requires_grad:
            y = x.clone()
        else:
            y = torch.as_tensor(x, dtype=torch.float64).detach().clone().requires_grad_(True)
        old, self.u = self.u, U32 if u is None else u
        try:
            return self._ieee(self.declare(y, self.default), 1, y.detach().abs())
        finally:
            self.u = old

    # ---- recording -----------------------------------------------------------------------
    def _add(self, y: torch.Tensor, k: int, size: torch.Tensor | None, rel: float) -> torch.Tensor:
        """Record y with k correctly rounded operations of magnitude <= size each, and a library
        function's error rel |y| (both also charged an underflow)."""
        if self.u > 0 and isinstance(y, torch.Tensor) and y.requires_grad:
            with torch._C.DisableTorchFunction():   # the shadow's dtype, not the real one
                shadow = y.dtype
            if shadow != torch.float64:
                raise RuntimeError(f"a tracked op produced {shadow}, expected float64: the shadow "
                                   "computation lost precision")
            self.records.append((y, k, size, rel, self.u))
            self._recorded.add(id(y))
        return y

    @staticmethod
    def _errors(y: torch.Tensor, k: int, size: torch.Tensor | None, rel: float, u: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A record's (det, sqrt(var), worst) per element of y, flat float64. Sizes are capped at
        1e150: an infinite or huge y (a masked score, a score plus finfo.min) has derivative 0
        wherever the result is finite, and 0 times the cap stays 0 (never 0 * inf); a nonzero
        derivative still gives an enormous bound. A nan y sits on a dead branch: size 0."""
        tiny = TINY if u >= U32 else 2.0 ** -1022
        n = y.numel()
        if k:
            s = torch.as_tensor(size, dtype=torch.float64).expand_as(y).reshape(n).nan_to_num(0.0, 1e150).clamp(max=1e150)
            det = torch.full((n,), k * tiny, dtype=torch.float64)
            worst = (gamma(k, u) if k * u < 1 else 1e150) * s + det
            return det, (k ** 0.5 * u) * s, worst
        det = (rel * y.detach().abs().reshape(n) + tiny).nan_to_num(0.0, 1e150).clamp(max=1e150)
        return det, torch.zeros(n, dtype=torch.float64), det

    def _ieee(self, y: torch.Tensor, k: int, size: torch.Tensor) -> torch.Tensor:
        """k correctly rounded operations, each on a quantity of magnitude <= size."""
        return self._add(y, k, size, 0.0)

    def _approx(self, y: torch.Tensor, ulps: float) -> torch.Tensor:
        """A library function accurate to `ulps` ulps (worst case, not modelled as random)."""
        return self._add(y, 0, None, 2 * ulps * self.u)

    def _rounded_once(self, y: torch.Tensor) -> torch.Tensor:
        return self._ieee(y, 1, y.detach().abs())

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "dtype":
            return self.real(args[0])   # code that reads x.dtype sees its own dtype, not float64
        kwargs = kwargs or {}
        target = kwargs.get("dtype")
        if name in CASTS:
            target, args = CASTS[name], (args[0], torch.float64)
            func, name = torch.Tensor.to, "to"
        elif name in ("to", "type"):
            for a in args[1:]:
                if isinstance(a, torch.dtype):
                    target = a
                elif isinstance(a, torch.Tensor):
                    target = self.real(a)
            args = [args[0], *(float64_dtype(a) if not isinstance(a, torch.Tensor) else a.to(torch.float64)
                               if a.is_floating_point() else a for a in args[1:])]
        kwargs = {k: float64_dtype(v) for k, v in kwargs.items()}
        tensors = [a for a in (*flat(args), *flat(kwargs.values())) if isinstance(a, torch.Tensor)]
        real = target if isinstance(target, torch.dtype) and target.is_floating_point else self._promoted(tensors)
        tracked = any(a.requires_grad for a in tensors)
        if name == "to":
            return self._cast(func, args, kwargs, real, tracked)
        old, self.u = self.u, self._forced if self._forced is not None else UNITS.get(real, U32)
        try:
            y = self._tag(self._op(func, name, args, kwargs, tracked), real)
        finally:
            self.u = old
        if tracked and isinstance(y, torch.Tensor) and y.is_floating_point() and not bool(torch.isfinite(y).all()):
            for t in tensors:   # the backward of an op with an inf or nan output may send nan back
                hook_dead_branches(t)
        return y

    def _promoted(self, tensors: list[torch.Tensor]) -> torch.dtype:
        """The result dtype of an op on these tensors in the code under test (torch's type
        promotion among floating dtypes: dimensioned tensors first, then 0-dim ones)."""
        floats = [t for t in tensors if t.is_floating_point()]
        for group in ([t for t in floats if t.dim() > 0], floats):
            if group:
                out = self.real(group[0])
                for t in group[1:]:
                    out = torch.promote_types(out, self.real(t))
                return out
        return self.default

    def _tag(self, y: Any, real: torch.dtype) -> Any:
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            y._fpb_real = real
        elif isinstance(y, (tuple, list)):
            for t in y:
                self._tag(t, real)
        return y

    def _cast(self, func: Callable, args: Sequence, kwargs: dict, real: torch.dtype, tracked: bool) -> Any:
        """A cast: exact, unless it narrows a tracked value's dtype (one rounding at the new unit)."""
        x = args[0]
        y = func(*args, **kwargs)
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            return y
        if y is x:
            y = x.clone()   # a new node: x keeps its own dtype
        before = self.real(x) if x.is_floating_point() else None
        self._tag(y, real)
        if tracked and before is not None and UNITS.get(real, 0.0) > UNITS.get(before, 0.0):
            old, self.u = self.u, self._forced if self._forced is not None else UNITS[real]
            try:
                return self._ieee(y, 1, y.detach().abs())
            finally:
                self.u = old
        return y

    def _op(self, func: Callable, name: str, args: Sequence, kwargs: dict, tracked: bool) -> Any:
        if not tracked or self.u == 0 or name in EXACT_OPS:
            if name == "dropout" and tracked:
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                assert p == 0 or not training, "dropout must be off in a traced forward"
            return func(*args, **kwargs)
        in_place = (name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_OPS or "out" in kwargs
        if in_place and name in EXACT_IN_PLACE and id(args[0]) not in self._recorded:
            return func(*args, **kwargs)   # places values into a tensor whose error nobody recorded
        if in_place:
            raise NotImplementedError(f"in-place op {name} on a tracked tensor: write it out of place")
        composite = _COMPOSITES.get(name)
        if composite is not None:
            return composite(self, *args, **kwargs)
        y = func(*args, **kwargs)
        if name in ROUNDED_OPS:
            return self._rounded_once(y)
        if name in ROUNDINGS:
            return self._ieee(y, ROUNDINGS[name], y.detach().abs())
        if name in TRANSCENDENTAL_OPS:
            return self._approx(y, TRANSCENDENTAL_ULPS)
        if name in ("pow", "__pow__"):
            exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
            if isinstance(exponent, (int, float)) and exponent in (1, 2):
                return self._rounded_once(y)              # x * x
            return self._approx(y, TRANSCENDENTAL_ULPS)
        if name in MATMUL_OPS:
            return self._matmul(name, args, kwargs, y)
        if name in ("sum", "mean", "cumsum"):
            x = args[0].detach()
            n = x.shape[args[1] if len(args) > 1 else kwargs["dim"]] if name == "cumsum" else x.numel() // max(1, y.numel())
            # every partial sum is a sum of a subset of the terms: at most max(Σ x+, Σ x-) (for a
            # mean, that / n: its n - 1 additions and the division are n roundings of that size)
            size = (func(x.abs(), *args[1:], **kwargs) + y.detach().abs()) / 2   # (Σ|x| + |Σx|) / 2
            return self._ieee(y, n if name == "mean" else n - 1, size)
        raise NotImplementedError(f"fp_bounds has no rounding rule for {name!r} ({func}); add one")

    def _matmul(self, name: str, args: Sequence, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
        if name in ("addmm", "baddbmm"):  # bias + a @ b
            bias, a, w = args[:3]
        elif name == "linear":
            a, w = args[0], args[1].t()
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
        elif name == "__rmatmul__":
            w, a, bias = args[0], args[1], None
        else:
            a, w, bias = args[0], args[1], None
        size = subset_sum_bound(a, w, y) if bias is None else (
            torch.matmul(a.detach().abs(), w.detach().abs()) + bias.detach().abs() + y.detach().abs()) / 2
        return self._ieee(y, a.shape[-1] + (bias is not None), size)

    # ---- compositions ----------------------------------------------------------------------
    def _softmax_parts(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(max, x - max, exp of it, their sum), recorded; the max is exact and detached, as
        softmax does not depend on it (only the sub-ops' errors do)."""
        m = x.detach().amax(dim, keepdim=True)
        m = m.masked_fill(~torch.isfinite(m), 0.0)
        d = self._rounded_once(x - m)
        e = self._approx(torch.exp(d), SOFTMAX_EXP_ULPS)
        s = self._ieee(e.sum(dim, keepdim=True), x.shape[dim] - 1, e.detach().sum(dim, keepdim=True))
        return m, d, e, s

    def softmax(self, x: torch.Tensor, dim: int, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> torch.Tensor:
        _, _, e, s = self._softmax_parts(x.to(torch.float64), dim)
        y = e / s
        return self._ieee(y, 2, y.detach().abs())   # ATen multiplies by 1 / sum: two roundings

    def log_softmax(self, x: torch.Tensor, dim: int, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> torch.Tensor:
        _, d, _, s = self._softmax_parts(x.to(torch.float64), dim)
        return self._rounded_once(d - self._approx(torch.log(s), TRANSCENDENTAL_ULPS))

    def logsumexp(self, x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
        m, _, _, s = self._softmax_parts(x, dim)
        y = self._rounded_once(m + self._approx(torch.log(s), TRANSCENDENTAL_ULPS))
        return y if keepdim else y.squeeze(dim)

    def logcumsumexp(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        m = x.detach().amax(dim, keepdim=True)
        m = m.masked_fill(~torch.isfinite(m), 0.0)
        e = self._approx(torch.exp(self._rounded_once(x - m)), TRANSCENDENTAL_ULPS)
        c = torch.cumsum(e, dim)
        c = self._ieee(c, x.shape[dim] - 1, c.detach())
        return self._rounded_once(m + self._approx(torch.log(c), TRANSCENDENTAL_ULPS))

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return self._rounded_once(1.0 / self._sigmoid_den(x))

    def silu(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self._rounded_once(x / self._sigmoid_den(x))   # ATen: x / (1 + exp(-x))

    def _sigmoid_den(self, x: torch.Tensor) -> torch.Tensor:
        return self._rounded_once(1.0 + self._approx(torch.exp(-x), TRANSCENDENTAL_ULPS))

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        """scaled_dot_product_attention by its definition: q k^T * scale, mask, softmax, @ v."""
        assert dropout_p == 0, "dropout must be off in a traced forward"
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        kt = k.transpose(-1, -2)
        s = self._matmul("matmul", (q, kt), {}, torch.matmul(q, kt))
        s = self._rounded_once(s * (q.shape[-1] ** -0.5 if scale is None else scale))
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        if attn_mask is not None:
            s = (s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                 else self._rounded_once(s + attn_mask))
        p = self.softmax(s, -1)
        return self._matmul("matmul", (p, v), {}, torch.matmul(p, v))

    # ---- the bounds ----------------------------------------------------------------------
    def bounds(self, out: torch.Tensor, lam: float = LAMBDA, elementwise: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilistic, worst-case) bound on |float32 - exact| for every element of out:
        Σ|g| det + lam sqrt(Σ g^2 var) and Σ|g| worst, g = ∂out/∂y (module doc).

        elementwise: out's element i depends only on element i of every recorded op (which all
        have out's shape), so one backward pass of out.sum() gives every derivative."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # small ops one after another (see __enter__)
        try:
            return self._elementwise(out, lam) if elementwise else self._bounds(out, lam)
        finally:
            torch.set_num_threads(threads)

    def _elementwise(self, out: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        ys = [r[0] for r in self.records]
        grads = torch.autograd.grad(out.sum(), ys, retain_graph=True, allow_unused=True) if ys else []
        det, var, worst = (torch.zeros(out.numel(), dtype=torch.float64) for _ in range(3))
        for g, record in zip(grads, self.records):
            if g is None:
                continue   # an op no output depends on
            assert g.shape == out.shape, f"elementwise bound: an op of shape {tuple(g.shape)}, out {tuple(out.shape)}"
            d, sd, w = self._errors(*record)
            g = dead_branch_grad(g).reshape(-1).abs()
            det, var, worst = det + g * d, var + (g * sd).square(), worst + g * w
        prob = torch.minimum(det + lam * var.sqrt(), worst)
        return prob.view(out.shape), worst.view(out.shape)

    def _bounds(self, out: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        flat = out.reshape(-1)
        M = flat.numel()
        det, var, worst = (torch.zeros(M, dtype=torch.float64) for _ in range(3))
        if self.records and out.requires_grad:
            ys = [r[0] for r in self.records]
            errs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # record -> ([n, 2] det & worst, [n] sqrt var)
            batch = max(1, min(M, BATCH_ELEMENTS // max(1, sum(y.numel() for y in ys))))
            for lo in range(0, M, batch):
                hi = min(M, lo + batch)
                seeds = torch.zeros((hi - lo, M), dtype=torch.float64)
                seeds[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0        # one-hot rows
                grads = torch.autograd.grad(flat, ys, grad_outputs=seeds, retain_graph=True,
                                            is_grads_batched=True, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is None:
                        continue   # an op no output depends on
                    if i not in errs:
                        d, sd, w = self._errors(*self.records[i])
                        errs[i] = torch.stack([d, w], 1), sd
                    dw, sd = errs[i]
                    g = dead_branch_grad(g).reshape(hi - lo, -1).abs()         # [m, numel(y)]
                    both = g @ dw                                               # [m, 2]
                    det[lo:hi] += both[:, 0]
                    worst[lo:hi] += both[:, 1]
                    var[lo:hi] += (g * sd).square().sum(-1)
        # the worst case is a bound too: the smaller one holds (it matters for short sums)
        prob = torch.minimum(det + lam * var.sqrt(), worst)
        return prob.view(out.shape), worst.view(out.shape)

    def bound(self, out: torch.Tensor, lam: float = LAMBDA, elementwise: bool = False) -> torch.Tensor:
        """The probabilistic bound of `bounds`: what tests compare with."""
        return self.bounds(out, lam, elementwise)[0]


_COMPOSITES: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": RoundingTracer.softmax, "log_softmax": RoundingTracer.log_softmax,
    "logsumexp": RoundingTracer.logsumexp, "logcumsumexp": RoundingTracer.logcumsumexp,
    "sigmoid": RoundingTracer.sigmoid,
    "silu": RoundingTracer.silu, "scaled_dot_product_attention": RoundingTracer.sdpa,
}


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """Assert |got - want| <= bound elementwise (want float64, bound from RoundingTracer); the
    message says where, by how much, and the worst ratio."""
    diff = (got.double() - want.double()).abs()
    bad = ~(diff <= bound)
    bad &= ~((got.double() == want.double()) & bad)   # equal infinities (masked tokens)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        ratio = (diff / bound.clamp(min=1e-300)).reshape(-1)
        raise AssertionError(
            f"{what}: {int(bad.sum())} / {bad.numel()} elements exceed the float32 error bound; "
            f"first at flat index {i}: got {got.reshape(-1)[i].item():.9g}, float64 reference "
            f"{want.reshape(-1)[i].item():.9g}, |diff| {diff.reshape(-1)[i].item():.3g} > bound "
            f"{bound.reshape(-1)[i].item():.3g} (worst |diff| / bound {ratio.nan_to_num(0.0).max().item():.3g})")
