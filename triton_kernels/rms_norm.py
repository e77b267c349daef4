"""RMSNorm forward and backward for the lean frozen path.

The forward writes y and the float32 inverse RMS of each row (what backward keeps besides the input,
which stays in its own dtype: no float32 copy of it exists). The backward recomputes xhat from the
input and rstd, writes dx, and accumulates each program's share of the weight gradient in float32
registers over its rows; the host sums the per-program partials (a few hundred rows of `hidden`).

Flavours, as `slimtune.layers.lean` names them: llama, y = weight * xhat rounded to x's dtype (the
product in y's dtype), and gemma, y = (offset + weight) * xhat in float32, rounded once. The
roundings of the backward follow the autograd of those forwards: the llama flavour rounds dy * weight
and dy * xhat to dy's dtype before they are used or summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_devices, check_matrix, num_sms

MAX_WIDTH = 65536  # one row lives in registers


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, N, D, s_xn, s_xd, s_w, s_yn, eps, offset,
    SCALE_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    in_n, in_d = rows < N, cols < D
    mask = in_n[:, None] & in_d[None, :]
    r = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r * s_xn + cols[None, :] * s_xd, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
    xhat = xf * rstd[:, None]
    w = tl.load(w_ptr + cols * s_w, mask=in_d, other=0.0).to(tl.float32)[None, :]
    y = xhat * (offset + w) if SCALE_FP32 else xhat.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + r * s_yn + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=in_n)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, N, D, s_dyn, s_dyd, s_xn, s_xd, s_w, s_dxn, offset,
    rows_each,
    SCALE_FP32: tl.constexpr, HAS_DX: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_d = cols < D
    w = tl.load(w_ptr + cols * s_w, mask=in_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = (pid * rows_each).to(tl.int64)
    x_row, dy_row, dx_row = x_ptr + first * s_xn, dy_ptr + first * s_dyn, dx_ptr + first * s_dxn
    for row in range(first, tl.minimum(first + rows_each, N)):
        x = tl.load(x_row + cols * s_xd, mask=in_d, other=0.0)
        dy = tl.load(dy_row + cols * s_dyd, mask=in_d, other=0.0)
        rstd = tl.load(rstd_ptr + row)
        xhat = x.to(tl.float32) * rstd
        dyf = dy.to(tl.float32)
        if SCALE_FP32:
            g = dyf * (offset + w)
            dw += dyf * xhat
        else:
            g = (dyf * w).to(dy_ptr.dtype.element_ty).to(tl.float32)
            xhat_rounded = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += (dyf * xhat_rounded).to(dy_ptr.dtype.element_ty).to(tl.float32)
        if HAS_DX:
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_d)
        x_row += s_xn
        dy_row += s_dyn
        dx_row += s_dxn
    tl.store(dw_ptr + pid * D + cols, dw, mask=in_d)


def _check(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    check_matrix("x", x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be 1-D of size {x.shape[1]}, got shape {tuple(weight.shape)}")
    check_devices(x=x, weight=weight)
    if x.shape[1] > MAX_WIDTH:
        raise ValueError(f"rows of {x.shape[1]} features exceed the kernel's {MAX_WIDTH}")
    return x.shape


def _warps(block_d: int) -> int:
    return 1 if INTERPRET else min(16, max(4, block_d // 1024))


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, scale_in_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of the rows of x (N, D): y of dtype promote(x, weight), or x's dtype when the scale
    is applied in float32 (gemma); rstd float32 (N,)."""
    n, d = _check(x, weight)
    out_dtype = x.dtype if scale_in_fp32 else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n, d), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n and d:
        block_d = triton.next_power_of_2(d)
        block_n = 4 if INTERPRET else max(1, min(16, 4096 // block_d))
        _rms_norm_forward_kernel[(triton.cdiv(n, block_n),)](
            x, weight, y, rstd, n, d, x.stride(0), x.stride(1), weight.stride(0), y.stride(0), eps, offset,
            SCALE_FP32=scale_in_fp32, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=_warps(block_d),
        )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    scale_in_fp32: bool,
    need_dx: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dx in x's dtype or None, dweight in float32) for the rows of dy and x (N, D)."""
    n, d = _check(x, weight)
    check_matrix("dy", dy)
    if dy.shape != x.shape or rstd.shape != (n,) or rstd.dtype != torch.float32:
        raise ValueError(f"dy must match x {tuple(x.shape)} and rstd be float32 ({n},)")
    check_devices(dy=dy, x=x, rstd=rstd)
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device) if need_dx else None
    programs = max(1, min(n, 2 * num_sms(x.device)))
    rows = triton.cdiv(n, programs) if n else 1
    partial = torch.zeros((programs, d), dtype=torch.float32, device=x.device)
    if n and d:
        block_d = triton.next_power_of_2(d)
        _rms_norm_backward_kernel[(programs,)](
            dy, x, weight, rstd, x if dx is None else dx, partial, n, d,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), weight.stride(0),
            0 if dx is None else dx.stride(0), offset, rows,
            SCALE_FP32=scale_in_fp32, HAS_DX=need_dx, BLOCK_D=block_d, num_warps=_warps(block_d),
        )  # fmt: skip
    return dx, partial.sum(0)
