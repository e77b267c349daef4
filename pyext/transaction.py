"""All-or-nothing changes to a model.

`apply`, `load`, `unmerge` and sparse deltas validate everything before their first write; what can
still fail after it (an allocation while building layers, a device error) must not leave a half-changed
model. A `Transaction` records, before the first write, what each step may change (the module tree,
every module's attributes, `requires_grad` flags) and, per write, how to undo it (an inverse
permutation, the original values of the few entries written); on an exception it puts everything
back, in reverse order, and re-raises. It copies no dense weight: undo costs memory only for the
entries a step overwrites.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import torch
from torch import Tensor, nn

# The per-module dicts that module surgery mutates in place (set_submodule, register_buffer, hooks).
_MUTABLE_DICTS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


class Transaction:
    """`with Transaction(model) as tx:` ... `tx.keep_entries(weight, index, dim)` before a write ..."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            inner = {key: type(attrs[key])(attrs[key]) for key in _MUTABLE_DICTS if key in attrs}
            self._modules.append((module, attrs, inner))
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._undo: list[Callable[[], None]] = []

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Run `undo` if the transaction fails (undos run last registered first)."""
        self._undo.append(undo)

    def keep_entries(self, tensor: Tensor, index: Tensor, dim: int) -> None:
        """Keep `tensor`'s slices `index` along `dim`, to write them back on rollback."""
        index = index.to(tensor.device)
        original = tensor.detach().index_select(dim, index).clone()
        self.on_rollback(lambda: tensor.detach().index_copy_(dim, index, original))

    def keep(self, tensor: Tensor) -> None:
        """Keep all of `tensor` (a module trained in full that a load overwrites)."""
        original = tensor.detach().clone()
        self.on_rollback(lambda: tensor.detach().copy_(original))

    def rollback(self) -> None:
        with torch.no_grad():
            for undo in reversed(self._undo):
                undo()
        for module, attrs, inner in self._modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, saved in inner.items():
                live = attrs[key]
                live.clear()
                live.update(saved)
        for parameter, flag in self._flags:
            parameter.requires_grad_(flag)
        self._undo.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        if error is not None:
            self.rollback()
        return False
