"""The local float32 rounding errors fp_bounds.py charges for each torch op, and their constants.

Local errors (u = 2^-24; one float32 ulp is at most 2u |y|):
- matmul / linear / bmm / addmm, inner length n: n (+1 with a bias) roundings of size <= u S.
- sum / mean / cumsum over n terms: n - 1 roundings of size <= u S (mean: one more, u |y|).
- + - * / sqrt: one rounding u |y| (IEEE 754); rsqrt: two (ATen computes 1 / sqrt).
- exp, log, sin, cos, tanh, expm1, log1p, pow: TRANSCENDENTAL_ULPS ulps, worst case. ATen's
  Vectorized<float> calls SLEEF's 1.0-ulp "u10" functions; the scalar fallback (and
  ATEN_CPU_CAPABILITY=default) calls libm, whose float functions glibc documents at <= 2 ulps.
- softmax, log_softmax, logsumexp, sigmoid, silu and scaled_dot_product_attention are recorded
  as their compositions (max, x - max, exp, sum, divide or log, matmuls), with the exp of the
  softmax family at SOFTMAX_EXP_ULPS: ATen's softmax kernels and its CPU flash attention use
  `Vectorized<float>::exp_u20`, documented as "a faster version of exp with ULP=20".
- views, reshapes, indexing, cat, copies, max/min, where, masked_fill, neg, abs: exact (0).
- every rounding may also underflow: an absolute TINY = 2^-126 (float32's smallest normal, which
  covers flush-to-zero too) per rounding, added linearly (the standard model's eta term).
An op without a rule raises NotImplementedError: nothing is silently taken as exact.

Sizes S: every partial sum of a dot product or reduction, in any order or blocking, is a sum
of a subset of its terms, so at most max(P, N), P the sum of the positive terms and N of the
negative ones' magnitudes; P + N = Σ|terms| and P - N = the result, so max(P, N) is
(Σ|terms| + |result|) / 2: about half of Σ|terms| for terms of random signs.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


U32 = 2.0 ** -24   # unit roundoff of float32
U64 = 2.0 ** -53   # unit roundoff of float64
TINY = 2.0 ** -126  # float32's smallest normal: what an underflow (to a subnormal or 0) can lose
LAMBDA = 8.0       # probabilistic bound: P(exceeded) <= 2 exp(-LAMBDA^2 / 2) = 2.5e-14 per element
TRANSCENDENTAL_ULPS = 2.0   # SLEEF u10 (1 ulp) vectorised; glibc float libm <= 2 ulps (scalar path)
SOFTMAX_EXP_ULPS = 20.0     # ATen's Vectorized<float>::exp_u20 (softmax kernels, CPU flash attention)
BATCH_ELEMENTS = 1 << 22   # gradient elements held per batched backward pass (32 MiB in float64)
LOW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# unit roundoff of each floating dtype the code under test may use
UNITS = {torch.float64: U64, torch.float32: U32, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}

# ops that move, select or copy values: no rounding
EXACT_OPS = frozenset("""
    __getitem__ __get__ view view_as reshape reshape_as expand expand_as contiguous clone detach
    transpose permute t unsqueeze squeeze flatten unflatten movedim narrow select split chunk
    unbind cat concat concatenate stack repeat repeat_interleave flip roll tril triu gather
    index_select take_along_dim embedding where masked_fill neg __neg__ negative abs __abs__
    max amax min amin maximum minimum clamp clamp_min clamp_max clip topk sort argmax argmin
    to type type_as float double half bfloat16 cpu __len__ size dim numel zeros_like ones_like
    full_like empty_like new_zeros new_ones new_full new_empty __eq__ __ne__ __lt__ __le__
    __gt__ __ge__ eq ne lt le gt ge isfinite isinf isnan logical_not logical_and logical_or
    __and__ __or__ __invert__ any all nan_to_num diagonal diag_embed broadcast_to
    __format__ __repr__ __bool__ __int__ __float__ __index__ tolist item __hash__ requires_grad_
    dropout __reduce_ex__ __setstate__ __deepcopy__ __iter__ __contains__ scatter
    """.split())
ROUNDED_OPS = frozenset("""
    add __add__ __radd__ sub __sub__ __rsub__ rsub subtract mul __mul__ __rmul__ multiply div
    __truediv__ __rtruediv__ true_divide divide sqrt square reciprocal
    """.split())
ROUNDINGS = {"rsqrt": 2}   # ATen's rsqrt is 1 / sqrt: two roundings
IN_PLACE_OPS = frozenset("__iadd__ __isub__ __imul__ __itruediv__ __ipow__ __setitem__".split())
# in-place ops that only place values: allowed into a tensor that is not itself a record (its
# recorded error would then describe an older version)
EXACT_IN_PLACE = frozenset("__setitem__ copy_ scatter_ index_put_ masked_fill_ fill_ zero_".split())
TRANSCENDENTAL_OPS = frozenset("exp log sin cos tanh expm1 log1p log2 exp2 erf".split())
MATMUL_OPS = frozenset("matmul __matmul__ __rmatmul__ mm bmm linear addmm baddbmm".split())


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of n roundings."""
    if n <= 0:
        return 0.0
    assert n * u < 1, f"gamma_{n} is undefined at u = {u}: n u must be below 1"
    return n * u / (1 - n * u)


def float64_dtype(x: Any) -> Any:
    return torch.float64 if isinstance(x, torch.dtype) and x in LOW_DTYPES else x


def flat(items: Any) -> Iterator[Any]:
    for a in items:
        if isinstance(a, (list, tuple)):
            yield from flat(a)
        else:
            yield a


def dead_branch_grad(g: torch.Tensor) -> torch.Tensor:
    """The unselected branch of a torch.where (log1mexp evaluates both; exact_shifts subtracts
    -inf from -inf where h(s) = 0) can hold inf or nan, and autograd then sends 0 * inf = nan,
    which would spoil every derivative upstream. A nan derivative comes only from there (on a
    branch the output takes, the output itself would be nan): it is 0. Hooked on the inputs of
    every op whose output is not finite, and applied to every gradient read."""
    return torch.nan_to_num(g, nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def hook_dead_branches(t: torch.Tensor) -> None:
    if t.requires_grad and not getattr(t, "_fpb_hooked", False):
        t.register_hook(dead_branch_grad)
        t._fpb_hooked = True


def subset_sum_bound(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max(P, N) per element of y = a @ b (+ bias): P the sum of its positive terms, N of its
    negative ones. Every partial sum of any summation order, and every product, is a sum of a
    subset of the terms, so its magnitude is at most this. P + N = |a| @ |b| (+ |bias|) and
    P - N = y, so max(P, N) = (|a| @ |b| + |y|) / 2: half of what Σ|a b| would charge, for
    random signs."""
    return (torch.matmul(a.detach().abs(), b.detach().abs()) + y.detach().abs()) / 2
