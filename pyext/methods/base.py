"""The contract between `slimtune.apply/save/load/merge` and one fine-tuning method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..config import MethodConfig
from ..transaction import Transaction


@dataclass(frozen=True)
class Replacement:
    """One planned module swap: validated up front, built only once every swap has been validated.

    `writes` is `(index, axis)` where `build` writes checkpoint values into the replaced module's
    weight (its slices `index` along `axis`), so that a failed commit can put the originals back.
    """

    name: str
    build: Callable[[], nn.Module]
    writes: tuple[Tensor, int] | None = None


MERGE_RECORD = "_slimtune_unmerge"  # set by a merge that `slimtune.unmerge` can undo: (config, records)


@dataclass(frozen=True)
class Step:
    """A change made before the layers are built (S2FT's co-permutation, LoRA's fused MLPs).

    `do` writes once, at its end (a `do` that fails wrote nothing); `undo` reverses a finished `do`
    exactly; None where `do` only swaps modules or sets module attributes, which the commit's
    transaction puts back by itself.
    """

    do: Callable[[], None]
    undo: Callable[[], None] | None = None


@dataclass
class Plan:
    """Everything `apply`/`load` will do, decided before the model is touched.

    The steps run first, then the swaps are built and installed, all in one transaction (see
    `slimtune.transaction`); `extra` is the method's own record of what it did (a typed object that
    only its glue reads), kept in the model's patch state for `merge`, `save` and `describe`.
    """

    replacements: list[Replacement]
    steps: list[Step] = field(default_factory=list)
    extra: Any = None
    full_modules: list[str] = field(default_factory=list)  # modules_to_save, by full name
    full_values: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (parameter, saved value)


class Method:
    """Default behaviour for methods that swap modules for layers with a `to_linear()`."""

    name: str = ""

    def plan(self, model: nn.Module, config: MethodConfig, saved: dict[str, Tensor] | None = None) -> Plan:
        """Validate and plan every change without touching the model; `saved` restores a checkpoint."""
        raise NotImplementedError

    def checkpoint_tensors(self, layers: dict[str, nn.Module], extra: Any) -> dict[str, Tensor]:
        """The tensors a checkpoint keeps, keyed `<module name>.<tensor>`."""
        tensors: dict[str, Tensor] = {}
        for name, layer in layers.items():
            tensors.update({f"{name}.{key}": value for key, value in layer.checkpoint_tensors().items()})
        return tensors

    def original_index(self, name: str, layer: nn.Module, extra: Any) -> Tensor:
        """Where the trained entries of layer `name` sit in the original model's layout."""
        return layer.index.cpu()

    def describe(self, extra: Any) -> dict[str, Any]:
        """What `slimtune.describe` adds for this method (e.g. which layers run fused)."""
        return {}

    def unpatch(
        self, model: nn.Module, layers: dict[str, nn.Module], extra: Any, transaction: Transaction
    ) -> None:
        """Put plain modules holding the trained weights back in place of the method's layers; every
        value write registers its undo with `transaction` (module swaps it undoes by itself)."""
        for name, layer in layers.items():
            model.set_submodule(name, layer.to_linear())
