"""A frozen dense linear whose selected columns or rows train in place (PaCA, S2FT).

The dense weight stays the single source of the forward: one GEMM, no adapter branch. The trained
tensor (`out x r` columns or `r x in` rows) is the authority for the selected entries; `sync_()`
writes it into the weight before a forward whenever it may have changed, so no forward runs on
stale values.

"May have changed" is decided per layer, with no global state: the trained tensor received a
gradient since the last sync (a hook on the tensor marks the layer stale; an optimizer can only
step a tensor that has a gradient, and torch's fused optimizers write through raw pointers without
bumping version counters), or it still holds a gradient, or the version counter or storage of the
trained tensor or the weight moved (manual in-place updates, `load_state_dict`). Writes through
`.data` are invisible to all three; call `sync_()` after such writes. A compiled forward keeps no
Python state between calls, so under `torch.compile` every forward writes the trained entries
(`out x r` elements per layer, small next to the GEMM).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import library, ops
from ..library import COLUMNS, ROWS

__all__ = ["COLUMNS", "ROWS", "PartialLinear", "is_dtensor"]


class PartialLinear(nn.Module):
    """Drop-in `nn.Linear` replacement training the columns or rows `index` of its weight in place.

    Subclasses name the trained parameter and the index buffer, which name them in state dicts.
    """

    trained_name: ClassVar[str]
    index_name: ClassVar[str]
    sharded = False  # set by slimtune.sharding under FSDP2: forwards read the engine's gathered weight

    def __init__(
        self,
        base: nn.Linear,
        index: Tensor,
        axis: int,
        master_dtype: torch.dtype | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.axis = base.in_features, base.out_features, axis
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        size = self.weight.shape[axis]
        ops.check_index(index, size, f"{type(self).__name__} ({'columns' if axis else 'rows'})", True)
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{type(self).__name__}: scale must be a finite number > 0, got {scale!r}")
        index = index.to(device=self.weight.device).clone()  # each layer owns its index
        self.register_buffer(self.index_name, index)
        self.scale = float(scale)
        initial = self.weight.detach().index_select(axis, index)
        trained = initial.to(master_dtype or self.weight.dtype) / self.scale
        setattr(self, self.trained_name, nn.Parameter(trained))
        # The base values of the weight's entries: what `slimtune.delta` measures the change against.
        self.register_buffer("initial", initial, persistent=False)
        self._synced: tuple[int, ...] | None = None
        self._stale = False  # a gradient arrived since the last sync
        self._stepped_by_owner = False  # the last write was a bound PartialAdamW's fused step
        self._install_hooks()

    def _install_hooks(self) -> None:
        """Per-layer hooks (bound methods, so the layer pickles; tensor hooks are not copied)."""
        self.trained.register_post_accumulate_grad_hook(self._mark_stale)
        self.register_state_dict_pre_hook(self._sync_before_state_dict)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._install_hooks()

    def _mark_stale(self, _param: Tensor) -> None:
        self._stale, self._stepped_by_owner = True, False

    def _sync_before_state_dict(self, *_args) -> None:
        self.sync_()

    @property
    def trained(self) -> nn.Parameter:
        return getattr(self, self.trained_name)

    def effective(self) -> Tensor:
        """The trained entries in weight units: scale * trained (rounded to the weight's dtype on the
        write into the weight)."""
        return self.trained if self.scale == 1.0 else self.trained * self.scale

    def change(self) -> Tensor:
        """The change of the weight's entries since `apply`, exactly (float64): what the weight holds
        (the master rounded, where there is one) minus what it held."""
        written = self.effective().detach().to(self.weight.dtype)
        return written.double() - self.initial.double()

    @property
    def master(self) -> bool:
        """Whether the trained tensor is a higher-precision master of the weight's entries."""
        return self.trained.dtype != self.weight.dtype

    @property
    def index(self) -> Tensor:
        return getattr(self, self.index_name)

    @property
    def r(self) -> int:
        return self.index.numel()

    def _version_key(self) -> tuple[int, ...]:
        trained, weight = self.trained, self.weight
        return (trained._version, weight._version, trained.data_ptr(), weight.data_ptr())

    def needs_sync(self) -> bool:
        """Whether the trained entries may differ from the weight's (see the module docstring)."""
        if self._stale or self._version_key() != self._synced:
            return True
        # Any optimizer may step again on the gradient it holds, unless our own fused step wrote it.
        return self.trained.grad is not None and not self._stepped_by_owner

    @torch.no_grad()
    def sync_(self, force: bool = False, by_owner: bool = False) -> None:
        """Write the trained entries into the dense weight if they may have changed since the last sync
        (`force`: write them anyway; `by_owner`: see `mark_synced`). Sharded parameters (FSDP2's
        DTensors, between forwards) are written shard by shard, always."""
        if is_dtensor(self.weight):
            _write_sharded(self)
        elif force or self.needs_sync():
            library.run_write_trained(self.weight, self.index, self.effective().detach(), self.axis)
            self.mark_synced(by_owner)

    def mark_synced(self, by_owner: bool = False) -> None:
        """Record that the weight holds the trained entries (`by_owner`: a bound PartialAdamW's
        fused step wrote both, and will write both again on its next step)."""
        self._stale, self._stepped_by_owner = False, by_owner
        self._synced = self._version_key()

    def prepare_forward(self) -> None:
        """Make the weight hold the trained entries before a product reads it. A compiled graph keeps
        no Python state between calls, so there the entries are written every time. Under FSDP2 the
        sharded weight already holds them (`slimtune.sharding` writes them after each step) and the
        weight seen here is the engine's gathered copy, which is not written."""
        if torch.compiler.is_compiling():
            library.run_write_trained(self.weight, self.index, self.effective().detach(), self.axis)
        elif not self.sharded:
            self.sync_()

    def forward(self, x: Tensor) -> Tensor:
        self.prepare_forward()
        return library.run_partial_linear(x, self.weight, self.bias, self.effective(), self.index, self.axis)

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint keeps of this layer: the index and the trained tensor (its own dtype,
        before scaling)."""
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
        extra = (f", {self.trained.dtype} master" if self.master else "") + (
            f", scale={self.scale:g}" if self.scale != 1.0 else ""
        )
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, trained {kind}={self.r}{extra}"


def is_dtensor(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2's shards), told without importing torch.distributed."""
    return type(tensor).__name__ == "DTensor"


def _write_sharded(layer: PartialLinear) -> None:
    """The trained entries into this rank's shard of the weight (FSDP2 shards both on dim 0 in the
    same chunks). Columns (`out x r`) split by the weight's rows: each rank writes its own, without
    communication. Rows (`r x in`) are gathered (r x in elements) and each rank writes the rows its
    shard holds."""
    weight, trained = layer.weight.to_local(), layer.trained
    values = (trained.to_local() if layer.axis == COLUMNS else trained.full_tensor()).detach()
    values = (values * layer.scale if layer.scale != 1.0 else values).to(weight.dtype)
    if layer.axis == COLUMNS:
        weight.index_copy_(1, layer.index.to(weight.device), values)
        return
    world, rank = layer.weight.device_mesh.size(), layer.weight.device_mesh.get_local_rank()
    owned = torch.arange(layer.out_features).chunk(world)  # FSDP2's row chunks
    mine = owned[rank] if rank < len(owned) else owned[0][:0]
    start, stop = (int(mine[0]), int(mine[-1]) + 1) if mine.numel() else (0, 0)
    index = layer.index.cpu()
    here = (index >= start) & (index < stop)
    weight.index_copy_(0, (index[here] - start).to(weight.device), values[here.to(values.device)])
