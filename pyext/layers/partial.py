"""A frozen dense linear whose selected columns or rows train in place (PaCA, S2FT).

The dense weight stays the single source of the forward: one GEMM, no adapter branch. The trained
tensor (`out x r` columns or `r x in` rows) is the authority for the selected entries; `sync_()`
writes it into the weight before a forward whenever it may have changed, so no forward runs on
stale values.

"May have changed" is: the version counter of the trained tensor or the weight moved (in-place
updates, manual or by an optimizer), or any torch optimizer stepped since the last sync (fused
optimizers write through raw pointers and do not bump version counters). In-place writes through
`.data` are invisible to both; call `sync_()` after such writes.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import ops

COLUMNS, ROWS = 1, 0

_optimizer_steps = itertools.count(1)
_step_epoch = 0
_hook_handle = None


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    global _step_epoch
    if not getattr(optimizer, "keeps_partial_weights_in_sync", False):
        _step_epoch = next(_optimizer_steps)


def _install_step_hook() -> None:
    """Count every torch optimizer step once a partial layer exists (a global, cheap hook)."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_count_optimizer_step)


def write_trained(weight: Tensor, index: Tensor, trained: Tensor, axis: int) -> None:
    """weight[:, index] = trained (columns) or weight[index, :] = trained (rows), in place."""
    if axis == COLUMNS:
        ops.scatter_columns(weight, index, trained)
    else:
        ops.scatter_columns(weight.t(), index, trained.t())


class _PartialMatmul(torch.autograd.Function):
    """y = x W^T + b with gradients for W[:, idx] (columns) or W[idx, :] (rows) only.

    Columns save only x[..., idx] (compact); rows need the whole input, as a dense weight gradient
    would, but use only dy[..., idx]. The input gradient always flows through the dense weight.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, trained: Tensor, index: Tensor, axis: int
    ):
        y = F.linear(x, weight, bias)
        ctx.weight = weight  # by reference: the sync mutates it in place between steps
        ctx.trained_dtype, ctx.x_shape, ctx.axis = trained.dtype, x.shape, axis
        if ctx.needs_input_grad[3]:
            x2d = x.reshape(-1, x.shape[-1])
            kept = ops.gather_columns(x2d, index) if axis == COLUMNS else x2d
            ctx.save_for_backward(kept.to(y.dtype), index)  # under autocast the GEMM ran in y.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        grad_x = grad_trained = None
        if ctx.needs_input_grad[0]:
            grad_x = dy.matmul(ctx.weight.to(dy.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            kept, index = ctx.saved_tensors
            dy2d = dy.reshape(-1, dy.shape[-1])
            if ctx.axis == COLUMNS:
                grad_trained = ops.column_grad(dy2d, kept.to(dy.dtype), None, ctx.trained_dtype)
            else:
                grad_trained = ops.column_grad(kept.to(dy.dtype), dy2d, index, ctx.trained_dtype).t()
        return grad_x, None, None, grad_trained, None, None


class PartialLinear(nn.Module):
    """Drop-in `nn.Linear` replacement training the columns or rows `index` of its weight in place.

    Subclasses name the trained parameter and the index buffer, which name them in state dicts.
    """

    trained_name: ClassVar[str]
    index_name: ClassVar[str]

    def __init__(self, base: nn.Linear, index: Tensor, axis: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.axis = base.in_features, base.out_features, axis
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        index = index.to(device=self.weight.device, dtype=torch.long).clone()  # each layer owns its index
        self.register_buffer(self.index_name, index)
        initial = self.weight.detach().index_select(axis, index)
        setattr(self, self.trained_name, nn.Parameter(initial.clone()))
        # The base values of the trained entries: what `slimtune.delta` measures the change against.
        self.register_buffer("initial", initial, persistent=False)
        self.trained._slimtune_owner = self  # lets PartialAdamW write the weight in the same pass
        self._synced: tuple[int, ...] | None = None
        self.register_state_dict_pre_hook(lambda module, *_: module.sync_())
        _install_step_hook()

    @property
    def trained(self) -> nn.Parameter:
        return getattr(self, self.trained_name)

    @property
    def index(self) -> Tensor:
        return getattr(self, self.index_name)

    @property
    def r(self) -> int:
        return self.index.numel()

    def _version_key(self) -> tuple[int, ...]:
        trained, weight = self.trained, self.weight
        return (_step_epoch, trained._version, weight._version, trained.data_ptr(), weight.data_ptr())

    @torch.no_grad()
    def sync_(self) -> None:
        """Write the trained entries into the dense weight if either changed since the last sync."""
        if self._version_key() != self._synced:
            write_trained(self.weight, self.index, self.trained, self.axis)
            self._synced = self._version_key()

    def mark_synced(self) -> None:
        """Record that the weight holds the trained entries (for kernels that write both at once)."""
        self._synced = self._version_key()

    def forward(self, x: Tensor) -> Tensor:
        self.sync_()
        return _PartialMatmul.apply(x, self.weight, self.bias, self.trained, self.index, self.axis)

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint keeps of this layer: the index and the trained values."""
        self.sync_()
        return {"index": self.index, "trained": self.trained.detach()}

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` sharing this layer's (synced) weight and bias: merging is free."""
        self.sync_()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        kind = "columns" if self.axis == COLUMNS else "rows"
        return f"in_features={self.in_features}, out_features={self.out_features}, trained {kind}={self.r}"
