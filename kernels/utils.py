"""Shared pieces of the EGMA Triton kernels: interpreter detection, block-size helpers, dot
precision modes and small @triton.jit building blocks (row reductions, top-k, min-max threshold).

Conventions used by every kernel here:
    * every reduction, max and min accumulates in fp32, whatever the input dtype;
    * ties in a max / min / top-k go to the lowest index (``tie_break_left``), which is the
      ``torch.max(dim)`` / stable-sort rule the reference follows;
    * tiles are padded to powers of two and masked; padded entries never win a max or enter a sum.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# How a dense fp32 operand (cross_map's gradient and weight tiles) is multiplied with a feature
# tile of the input dtype on the tensor cores (GRAD_MODE constexpr of the cross_map kernels; late
# interaction's one-hot weight tile has its own modes, kernels/late_interaction.py):
#   0  fp32 features: plain IEEE fp32 dot (exact, no tensor cores);
#   1  bf16 features: the fp32 operand is split into bf16 hi + lo and multiplied twice, which keeps
#      ~16 mantissa bits of it (a single bf16 rounding would lose more than the output rounding);
#   2  fp16 features: 3-pass TF32 dot ("tf32x3", ~fp32 accuracy) on the upcast features; splitting
#      into fp16 hi + lo would underflow the tiny gradients fp16's exponent range cannot hold.
GRAD_FP32, GRAD_BF16_SPLIT, GRAD_TF32X3 = 0, 1, 2


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def grad_mode(dtype: torch.dtype) -> int:
    """GRAD_MODE for features of this dtype (see the table above)."""
    if dtype == torch.bfloat16:
        return GRAD_BF16_SPLIT
    if dtype == torch.float16:
        return GRAD_TF32X3
    return GRAD_FP32


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of feature x feature dots: exact IEEE for fp32 features (TF32 would lose
    13 mantissa bits); for 16-bit features the products are exact in fp32 anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pick_block(n: int, choices: tuple[int, ...], slack: float = 1.15) -> int:
    """The largest block in ``choices`` (descending) whose padded cover of n is within ``slack`` of
    the tightest cover, e.g. n = 196 -> 32 (224 rows) rather than 64 (256 rows)."""
    best = min(triton.cdiv(n, b) * b for b in choices)
    for b in choices:
        if triton.cdiv(n, b) * b <= slack * best:
            return b
    return choices[-1]


# ----------------------------------------------------------------------------------------------
# @triton.jit building blocks
# ----------------------------------------------------------------------------------------------
@triton.jit
def mixed_dot(a, b, acc, GRAD_MODE: tl.constexpr):
    """acc + a @ b for a fp32 operand ``a`` and a feature tile ``b`` of the input dtype, with the
    precision rule of GRAD_MODE (see kernels.utils)."""
    if GRAD_MODE == 1:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(a_hi, b, acc)
        acc = tl.dot(a_lo, b, acc)
    elif GRAD_MODE == 2:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def lse_with_zero(x, axis: tl.constexpr):
    """log(1 + sum(exp(x), axis)): log-sum-exp with an appended zero logit; -inf entries drop out."""
    mx = tl.maximum(tl.max(x, axis=axis), 0.0)
    return mx + tl.log(tl.exp(-mx) + tl.sum(tl.exp(x - tl.expand_dims(mx, axis)), axis=axis))


@triton.jit
def masked_lse(x, ok, axis: tl.constexpr):
    """log-sum-exp over the entries where ``ok`` (-inf where a line has none)."""
    xm = tl.where(ok, x, float("-inf"))
    mx = tl.max(xm, axis=axis)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(xm - tl.expand_dims(mx, axis)), axis=axis)
    return tl.where(total > 0, mx + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def row_l1(w):
    """Row-wise L1 normalisation of non-negative [R, C] weights (all-zero rows stay zero)."""
    total = tl.sum(w, axis=1)
    return w / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def topk_rows(x, ok, k, C: tl.constexpr):
    """Bool mask of the k largest entries of each row of x [R, C] among ``ok`` (ties to the lowest
    column, like a stable descending sort). k must not exceed the number of ok entries of a row."""
    cols = tl.arange(0, C)[None, :]
    sel = (cols < 0) & ok
    for _ in range(0, k):
        cand = tl.where(ok & (~sel), x, float("-inf"))
        best = tl.argmax(cand, axis=1, tie_break_left=True)
        sel = sel | (cols == best[:, None])
    return sel & ok


@triton.jit
def _minmax_rows(x, ok, count, C: tl.constexpr):
    """Row-wise (x - lo) / denom over ``ok`` entries, the authors' min-max (reference._minmax_rows):
    denom = hi - lo, or 1 / count where that range is zero; rows with nothing ok use lo = hi = 0.
    Returns (xt, denom, flat, argmin, argmax) with first-index extrema."""
    xlo = tl.where(ok, x, float("inf"))
    xhi = tl.where(ok, x, float("-inf"))
    lo = tl.min(xlo, axis=1)
    hi = tl.max(xhi, axis=1)
    any_ok = tl.max(ok.to(tl.int32), axis=1) > 0
    lo = tl.where(any_ok, lo, 0.0)
    hi = tl.where(any_ok, hi, 0.0)
    span = hi - lo
    flat = span == 0
    denom = tl.where(flat, 1.0 / tl.maximum(count, 1).to(tl.float32), span)
    xt = (x - lo[:, None]) / denom[:, None]
    amin = tl.argmin(xlo, axis=1, tie_break_left=True)
    amax = tl.argmax(xhi, axis=1, tie_break_left=True)
    return xt, denom, flat, amin, amax


@triton.jit
def threshold_weights(x, ok, count, gz, c1, c2, theta, floor, C: tl.constexpr):
    """The official omega on rows of x [R, C] (SPEC 3.1): min-max over ``ok``, pre = c1 * xt + c2 * gz,
    entries below theta zeroed, + floor, non-ok entries zeroed, then row-L1."""
    xt, denom, flat, amin, amax = _minmax_rows(x, ok, count, C)
    pre = c1 * xt + c2 * gz
    hat = tl.where(ok, tl.where(pre < theta, 0.0, pre) + floor, 0.0)
    return row_l1(hat)


@triton.jit
def threshold_weights_bwd(dw, x, ok, count, gz, c1, c2, theta, floor, C: tl.constexpr):
    """Gradient of :func:`threshold_weights` with respect to x, given dw (same shape): through the
    row-L1, the threshold (zeroed entries pass nothing), and min-max including the min and max
    themselves (to the first minimiser / maximiser)."""
    xt, denom, flat, amin, amax = _minmax_rows(x, ok, count, C)
    pre = c1 * xt + c2 * gz
    keep = ok & (pre >= theta)
    hat = tl.where(ok, tl.where(keep, pre, 0.0) + floor, 0.0)
    total = tl.sum(hat, axis=1)
    total = tl.where(total > 0, total, 1.0)
    w = hat / total[:, None]
    dhat = (dw - tl.sum(dw * w, axis=1)[:, None]) / total[:, None]
    dxt = c1 * tl.where(keep, dhat, 0.0)
    s1 = tl.sum(dxt, axis=1)
    s2 = tl.where(flat, 0.0, tl.sum(dxt * xt, axis=1))
    dlo = (s2 - s1) / denom
    dhi = -s2 / denom
    cols = tl.arange(0, C)[None, :]
    dx = dxt / denom[:, None]
    dx += tl.where(cols == amin[:, None], dlo[:, None], 0.0)
    dx += tl.where(cols == amax[:, None], dhi[:, None], 0.0)
    return dx
