"""PaCA layer: a frozen dense linear whose selected input columns train in place.

The dense weight stays the single source of the forward: one GEMM, no adapter branch. The trained
tensor `paca_columns` (out x r) is the authority for the selected columns; `sync_()` writes it into
the weight before a forward whenever it may have changed, so no forward runs on stale columns.

"May have changed" is: the version counter of the columns or the weight moved (in-place updates,
manual or by an optimizer), or any torch optimizer stepped since the last sync (fused optimizers
write through raw pointers and do not bump version counters). In-place writes through `.data` are
invisible to both; call `sync_()` after such writes.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import ops

_optimizer_steps = itertools.count(1)
_step_epoch = 0
_hook_handle = None


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    global _step_epoch
    if not getattr(optimizer, "keeps_paca_weights_in_sync", False):
        _step_epoch = next(_optimizer_steps)


def _install_step_hook() -> None:
    """Count every torch optimizer step once a PaCA layer exists (a global, cheap hook)."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_count_optimizer_step)


class _PaCAMatmul(torch.autograd.Function):
    """y = x W^T + b; saves only x[..., idx]; grads: dx through dense W, d(columns) = dy^T x[..., idx]."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, columns: Tensor, index: Tensor
    ) -> Tensor:
        y = F.linear(x, weight, bias)
        ctx.weight = weight  # by reference: the column sync mutates it in place between steps
        ctx.columns_dtype = columns.dtype
        ctx.x_shape = x.shape
        if ctx.needs_input_grad[3]:
            picked = ops.gather_columns(x.reshape(-1, x.shape[-1]), index)
            ctx.save_for_backward(picked.to(y.dtype))  # under autocast the GEMM ran in y.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        grad_x = grad_columns = None
        if ctx.needs_input_grad[0]:
            grad_x = dy.matmul(ctx.weight.to(dy.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            (picked,) = ctx.saved_tensors
            dy2d = dy.reshape(-1, dy.shape[-1])
            grad_columns = ops.column_grad(dy2d, picked.to(dy.dtype), None, ctx.columns_dtype)
        return grad_x, None, None, grad_columns, None


class PaCALinear(nn.Module):
    """Drop-in `nn.Linear` replacement that trains `r` selected input columns of its weight."""

    def __init__(self, base: nn.Linear, index: Tensor) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        index = index.to(device=self.weight.device, dtype=torch.long)
        self.register_buffer("paca_index", index)
        self.paca_columns = nn.Parameter(self.weight.detach().index_select(1, index).clone())
        self.paca_columns._slimtune_owner = self  # lets PartialAdamW write the weight in the same pass
        self._synced: tuple[int, ...] | None = None
        self.register_state_dict_pre_hook(lambda module, *_: module.sync_())
        _install_step_hook()

    @property
    def r(self) -> int:
        return self.paca_index.numel()

    def _version_key(self) -> tuple[int, ...]:
        cols, weight = self.paca_columns, self.weight
        return (_step_epoch, cols._version, weight._version, cols.data_ptr(), weight.data_ptr())

    @torch.no_grad()
    def sync_(self) -> None:
        """Write the trained columns into the dense weight if either changed since the last sync."""
        if self._version_key() != self._synced:
            ops.scatter_columns(self.weight, self.paca_index, self.paca_columns)
            self._synced = self._version_key()

    def mark_synced(self) -> None:
        """Record that the weight holds the columns (kernels that write both in one pass call this)."""
        self._synced = self._version_key()

    def forward(self, x: Tensor) -> Tensor:
        self.sync_()
        return _PaCAMatmul.apply(x, self.weight, self.bias, self.paca_columns, self.paca_index)

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` sharing this layer's (synced) weight and bias: merging is free."""
        self.sync_()
        weight = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
