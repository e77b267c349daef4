"""Gather and scatter of selected weight/activation columns.

PaCA saves ``x[:, idx]`` for the backward pass and, after each optimizer step,
writes the trained columns back into ``W[:, idx]``. Both are pure memory moves,
so each program copies one 2-D tile and masks the ragged edges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_devices, check_index, check_matrix


@triton.jit
def _gather_columns_kernel(
    x_ptr,
    idx_ptr,
    out_ptr,
    N,
    R,
    K,
    stride_xn,
    stride_xk,
    stride_idx,
    stride_on,
    stride_or,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    cols = tl.load(idx_ptr + offs_r * stride_idx, mask=mask_r, other=0)
    # Out-of-range indices are never dereferenced (they read as zero).
    valid_r = mask_r & (cols >= 0) & (cols < K)
    rows = offs_n.to(tl.int64)
    src = x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xk
    vals = tl.load(src, mask=mask_n[:, None] & valid_r[None, :], other=0.0)
    dst = out_ptr + rows[:, None] * stride_on + offs_r.to(tl.int64)[None, :] * stride_or
    tl.store(dst, vals, mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _scatter_columns_kernel(
    w_ptr,
    idx_ptr,
    cols_ptr,
    M,
    R,
    K,
    stride_wm,
    stride_wk,
    stride_idx,
    stride_cm,
    stride_cr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    cols = tl.load(idx_ptr + offs_r * stride_idx, mask=mask_r, other=0)
    # Out-of-range indices are skipped so a bad index cannot corrupt memory.
    valid_r = mask_r & (cols >= 0) & (cols < K)
    mask = mask_m[:, None] & valid_r[None, :]
    rows = offs_m.to(tl.int64)
    src = cols_ptr + rows[:, None] * stride_cm + offs_r.to(tl.int64)[None, :] * stride_cr
    vals = tl.load(src, mask=mask, other=0.0)
    dst = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wk
    tl.store(dst, vals.to(w_ptr.dtype.element_ty), mask=mask)


def _tile(rows: int, cols: int) -> tuple[int, int]:
    """Tile of about 4K elements, as wide as the (small) column count allows."""
    if INTERPRET:  # few, small programs: the interpreter pays per program
        return 32, 32
    block_c = min(64, triton.next_power_of_2(max(cols, 1)))
    block_r = min(4096 // block_c, triton.next_power_of_2(max(rows, 1)))
    return block_r, block_c


def gather_columns(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x[:, idx]`` as an (N, r) tensor of ``x.dtype`` (contiguous unless ``out`` is given).

    ``idx`` values must lie in ``[0, K)``; they are not checked on the host (that
    would need a device sync), and out-of-range entries read as zero.
    """
    check_matrix("x", x)
    check_index(idx, check_devices(x=x))
    n, k = x.shape
    r = idx.shape[0]
    if out is None:
        out = torch.empty((n, r), dtype=x.dtype, device=x.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (n, r):
            raise ValueError(f"out must have shape {(n, r)}, got {tuple(out.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out dtype {out.dtype} does not match x dtype {x.dtype}")
        check_devices(x=x, out=out)
    if n == 0 or r == 0:
        return out
    block_n, block_r = _tile(n, r)
    grid = (triton.cdiv(n, block_n), triton.cdiv(r, block_r))
    _gather_columns_kernel[grid](
        x, idx, out, n, r, k,
        x.stride(0), x.stride(1), idx.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def scatter_columns(weight: torch.Tensor, idx: torch.Tensor, cols: torch.Tensor) -> None:
    """Write ``weight[:, idx[j]] = cols[:, j]`` in place, rounding ``cols`` to ``weight.dtype``.

    ``idx`` must hold distinct values in ``[0, K)`` (duplicates leave an arbitrary
    winner); out-of-range entries are skipped rather than checked on the host.
    """
    check_matrix("weight", weight)
    check_matrix("cols", cols)
    check_index(idx, check_devices(weight=weight, cols=cols))
    m, k = weight.shape
    r = idx.shape[0]
    if tuple(cols.shape) != (m, r):
        raise ValueError(f"cols must have shape (weight rows, len(idx)) = {(m, r)}, got {tuple(cols.shape)}")
    if m == 0 or r == 0:
        return
    block_m, block_r = _tile(m, r)
    grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r))
    _scatter_columns_kernel[grid](
        weight, idx, cols, m, r, k,
        weight.stride(0), weight.stride(1), idx.stride(0), cols.stride(0), cols.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r,
    )  # fmt: skip
