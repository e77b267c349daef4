"""Rotary position embedding of one (batch, heads, seq, head_dim) tensor, forward or inverse.

Hugging Face's form: out = x * cos + rotate_half(x) * sin over the first `rotary` features (the cos
table's width; the rest pass through), rotate_half(x) = (-x2, x1) for the halves x1, x2. The
inverse (the backward: the transposed rotation) is g1 cos1 + g2 sin2, g2 cos2 - g1 sin1. One program
per (batch, position) loads that position's cos and sin once for every head; the math is float32,
rounded once to the dtype of x * cos (x's, or float32 for float32 tables under autocast). `x` may be
any strided view (HF passes the transpose of the projection's output); the output has x's layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_devices


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, H, S, D, HALF,
    sxb, sxh, sxs, sxd, sob, soh, sos, sod, scb, scs, scd, ssb, sss, ssd,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, s = (pid // S).to(tl.int64), (pid % S).to(tl.int64)
    heads, j = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_R)
    in_j = j < HALF
    c = cos_ptr + b * scb + s * scs
    n = sin_ptr + b * ssb + s * sss
    c1 = tl.load(c + j * scd, mask=in_j, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c + (j + HALF) * scd, mask=in_j, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(n + j * ssd, mask=in_j, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(n + (j + HALF) * ssd, mask=in_j, other=0.0).to(tl.float32)[None, :]
    mask = (heads < H)[:, None] & in_j[None, :]
    x = x_ptr + b * sxb + s * sxs + heads[:, None].to(tl.int64) * sxh
    o = out_ptr + b * sob + s * sos + heads[:, None].to(tl.int64) * soh
    x1 = tl.load(x + j[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + (j[None, :] + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    tl.store(o + j[None, :] * sod, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o + (j[None, :] + HALF) * sod, o2.to(out_ptr.dtype.element_ty), mask=mask)
    if BLOCK_P > 0:  # features past the rotary ones pass through
        p = 2 * HALF + tl.arange(0, BLOCK_P)
        keep = (heads < H)[:, None] & (p < D)[None, :]
        passed = tl.load(x + p[None, :] * sxd, mask=keep, other=0.0)
        tl.store(o + p[None, :] * sod, passed.to(out_ptr.dtype.element_ty), mask=keep)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (B, H, S, D) rotated by the (B, S, R) tables over its first R features (R even, <= D)."""
    if x.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"x must be (B, H, S, D) and cos, sin (B, S, R); got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")  # fmt: skip
    bsz, heads, seq, dim = x.shape
    rotary = cos.shape[-1]
    if rotary % 2 or rotary > dim or cos.shape[1] != seq or cos.shape[0] not in (1, bsz):
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)} (R even, <= D)")
    check_devices(x=x, cos=cos, sin=sin)
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))  # as x * cos would be
    if x.numel():
        half, rest = rotary // 2, dim - rotary
        table_b = 0 if cos.shape[0] == 1 else cos.stride(0)
        sin_b = 0 if sin.shape[0] == 1 else sin.stride(0)
        _rope_kernel[(bsz * seq,)](
            x, out, cos, sin, heads, seq, dim, half, *x.stride(), *out.stride(),
            table_b, cos.stride(1), cos.stride(2), sin_b, sin.stride(1), sin.stride(2),
            INVERSE=inverse, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_R=triton.next_power_of_2(max(half, 1)), BLOCK_P=triton.next_power_of_2(rest) if rest else 0,
            num_warps=1 if INTERPRET else 4,
        )  # fmt: skip
    return out
