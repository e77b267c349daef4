"""A module that stands in for a Hugging Face module without changing the model's state-dict keys."""

from __future__ import annotations

from typing import Any

from torch import nn


class StandIn(nn.Module):
    """Holds the original module's children under their own names (so parameter names and
    state-dict keys do not change) and the original itself, not as a child; any other attribute
    reads through to it. `restore()` gives the original back holding the current children."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.__dict__["original"] = original  # not a child: its children are ours
        for name, child in original.named_children():
            self._modules[name] = child  # (add_module would see the name through __getattr__)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def restore(self) -> nn.Module:
        original = self.original
        for name, child in self.named_children():
            original._modules[name] = child
        return original
