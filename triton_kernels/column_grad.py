"""Gradient of the PaCA-trained columns: ``dP = dy^T @ x[:, idx]``.

The reduction runs over tokens (N, large) while the output (M x r) is small, so
a plain tiled GEMM would launch too few programs. N is split into ``S`` chunks;
each program reduces one chunk for one output tile into its own fp32 slab of a
workspace, and a second pass sums the slabs in a fixed order and casts. This is
deterministic (no atomics) and costs one extra read of ``S * M * r`` floats,
which is small next to reading ``dy``. With ``S == 1`` the first pass writes the
output directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, check_devices, check_index, check_matrix, num_sms


@triton.jit
def _column_grad_kernel(
    dy_ptr,
    x_ptr,
    idx_ptr,
    dst_ptr,
    N,
    M,
    R,
    K,
    rows_per_split,
    stride_dyn,
    stride_dym,
    stride_xn,
    stride_xk,
    stride_idx,
    stride_ds,
    stride_dm,
    stride_dr,
    HAS_IDX: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Axis 0 walks output tiles (M fastest) so concurrently running programs
    # share the same rows of x in L2; axis 1 is the split of N.
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_r = tl.program_id(0) // num_m
    split = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if HAS_IDX:
        cols = tl.load(idx_ptr + offs_r * stride_idx, mask=mask_r, other=0)
        # Out-of-range indices are never dereferenced (they contribute zero).
        valid_r = mask_r & (cols >= 0) & (cols < K)
    else:
        cols = offs_r.to(tl.int64)
        valid_r = mask_r

    # 64-bit offsets: N * row stride can exceed 2**31 for long sequences.
    a_base = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    b_base = x_ptr + cols[None, :] * stride_xk
    n_start = split * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        rows = offs_n.to(tl.int64)
        a = tl.load(a_base + rows[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_base + rows[:, None] * stride_xn, mask=mask_n[:, None] & valid_r[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    dst = (
        dst_ptr
        + split.to(tl.int64) * stride_ds
        + offs_m.to(tl.int64)[:, None] * stride_dm
        + offs_r[None, :] * stride_dr
    )
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, numel, splits, BLOCK: tl.constexpr):
    """Sum the (splits, numel) fp32 workspace over splits in a fixed order and cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ptrs = ws_ptr + offs.to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(n: int, m: int, r: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Block sizes and split count: about two programs per SM, >= 4 N-blocks per split."""
    if INTERPRET:
        block_m = block_n = block_r = 16
        warps, stages, min_iters = 4, 1, 1
    else:
        block_r = min(128, max(16, triton.next_power_of_2(r)))
        block_m = 128 if m > 64 else max(16, triton.next_power_of_2(m))
        # 16-bit tiles of 128x64 + 64x128 use 32 KB per stage; fp32 halves BLOCK_N to match.
        block_n = 32 if dtype == torch.float32 else 64
        warps = 8 if block_m * block_r >= 128 * 128 else 4
        stages, min_iters = 3, 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(r, block_r)
    splits = max(1, min(triton.cdiv(2 * num_sms(device), tiles), triton.cdiv(n, min_iters * block_n)))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_R": block_r,
        "num_warps": warps,
        "num_stages": stages,
        "splits": triton.cdiv(n, rows_per_split),
        "rows_per_split": rows_per_split,
    }


def column_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return ``dy.T @ x[:, idx]`` (M, r), accumulated in fp32, without gathering x.

    ``dy`` is (N, M) and ``x`` is (N, K), any strides, same dtype. With ``idx=None``
    all columns of ``x`` are used (x is already the compact (N, r) buffer).
    ``out_dtype`` defaults to ``x.dtype``; float32 keeps the full accumulator.
    fp32 inputs use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set.
    Out-of-range ``idx`` entries are not checked on the host and contribute zero.
    """
    check_matrix("dy", dy)
    check_matrix("x", x)
    device = check_devices(dy=dy, x=x)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy and x must share a dtype, got {dy.dtype} and {x.dtype}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} rows (tokens) but x has {x.shape[0]}")
    if out_dtype is None:
        out_dtype = x.dtype
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if idx is not None:
        check_index(idx, device)

    n, m = dy.shape
    k = x.shape[1]
    r = k if idx is None else idx.shape[0]
    if n == 0 or m == 0 or r == 0:
        return torch.zeros((m, r), dtype=out_dtype, device=device)

    cfg = _launch_config(n, m, r, x.dtype, device)
    splits = cfg.pop("splits")
    out = torch.empty((m, r), dtype=out_dtype, device=device)
    if splits == 1:
        dst, stride_ds = out, 0
    else:
        dst = torch.empty((splits, m, r), dtype=torch.float32, device=device)
        stride_ds = dst.stride(0)
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(r, cfg["BLOCK_R"]), splits)
    _column_grad_kernel[grid](
        dy, x, x if idx is None else idx, dst,
        n, m, r, k, cfg.pop("rows_per_split"),
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), 0 if idx is None else idx.stride(0),
        stride_ds, dst.stride(-2), dst.stride(-1),
        HAS_IDX=idx is not None, PRECISION=precision, **cfg,
    )  # fmt: skip
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * r, block),)](dst, out, m * r, splits, BLOCK=block)
    return out
