"""The contract between `slimtune.apply/save/load/merge` and one fine-tuning method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from ..config import MethodConfig


@dataclass(frozen=True)
class Replacement:
    """One planned module swap: validated up front, built only once every swap has been validated."""

    name: str
    build: Callable[[], nn.Module]


class Method(Protocol):
    name: str

    def plan(
        self, model: nn.Module, config: MethodConfig, saved: dict[str, Tensor] | None = None
    ) -> list[Replacement]:
        """Validate and plan every swap without touching the model; `saved` restores a checkpoint."""

    def state_tensors(self, name: str, layer: nn.Module) -> dict[str, Tensor]:
        """The tensors of `layer` a checkpoint keeps (keys are prefixed with the module name)."""

    def is_layer(self, module: nn.Module) -> bool:
        """Whether `module` is one of this method's layers."""
