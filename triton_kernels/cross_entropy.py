"""Cross-entropy of a chunk of logits with its gradient written over the logits, in their dtype.

The lean LM head forms one chunk of logits at a time (a GEMM in the model's dtype); this kernel
reads each row twice (an online max and sum of exponentials, then the softmax) and overwrites the
row with d loss / d logits scaled by `scale` (1 / the number of targets, a device scalar: reading it
back would sync the card). No float32 copy of the chunk exists. Targets equal to `ignore_index`
give a zero loss and a zero gradient row. With a soft cap c (Gemma 2), z = c tanh(logits / c) and
the gradient carries the cap's derivative 1 - (z / c)^2. A target outside the vocabulary that is
not ignored gives a NaN loss (torch raises; a kernel cannot without a sync), never a read past the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_devices, check_matrix
from .lora import _tanh


@triton.jit
def _capped(z, softcap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        return _tanh(z / softcap) * softcap
    return z


@triton.jit
def _cross_entropy_kernel(
    z_ptr, t_ptr, loss_ptr, scale_ptr, V, s_zn, s_t, softcap, ignore_index,
    HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * s_zn
    target = tl.load(t_ptr + row * s_t)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    safe = tl.where(valid & in_range, target, 0)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = _capped(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), softcap, HAS_CAP)
        z = tl.where(cols < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    picked = _capped(tl.load(base + safe).to(tl.float32), softcap, HAS_CAP)
    # A target outside the vocabulary (and not ignored) makes the loss NaN rather than read past the row.
    loss = tl.where(in_range, lse - picked, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    scale = tl.where(valid, tl.load(scale_ptr), 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = _capped(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), softcap, HAS_CAP)
        g = tl.exp(z - lse) - tl.where(cols == safe, 1.0, 0.0)
        g = g * scale
        if HAS_CAP:
            g = g * (1.0 - (z / softcap) * (z / softcap))
        tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=cols < V)


def cross_entropy_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-row losses (float32, N) of `logits` (N, V) against `targets` (N,); the logits are replaced
    by the gradient of sum(losses) * scale in place. `scale`: a float32 tensor of one element."""
    check_matrix("logits", logits)
    if logits.stride(1) != 1:
        raise ValueError("logits must have contiguous rows (stride 1 along the vocabulary)")
    if targets.shape != (logits.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape ({logits.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")  # fmt: skip
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be one float32 element, got {scale.dtype} {tuple(scale.shape)}")
    check_devices(logits=logits, targets=targets, scale=scale)
    n, v = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n and v:
        block_v = min(1024 if INTERPRET else 8192, triton.next_power_of_2(v))
        _cross_entropy_kernel[(n,)](
            logits, targets, losses, scale, v, logits.stride(0), targets.stride(0),
            1.0 if softcap is None else float(softcap), ignore_index,
            HAS_CAP=softcap is not None, BLOCK_V=block_v, num_warps=1 if INTERPRET else 16,
        )  # fmt: skip
    return losses
