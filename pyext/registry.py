"""The method registry: every slimtune method is registered here once, by its own glue module.

`slimtune.apply/save/load/merge`, the trainer's recipes, `slimtune bench`, the demo and the CLI
help read the list of methods, their configs and what each can do from here. Adding a method is
its config (`config.py`), its layer (`layers/`), its glue (`methods/`, ending in one `register`
call) and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import MethodConfig

if TYPE_CHECKING:
    from .methods.base import Method

# Capabilities a method declares (MethodInfo.capabilities).
SPARSE_DELTA = "sparse-delta"  # `slimtune.delta` exports its change as a SparseDelta
MERGE = "merge"  # `slimtune.merge` gives plain modules with the same outputs
UNMERGE = "unmerge"  # `slimtune.unmerge` restores the adapter layers and the base bit for bit
FUSED_KERNELS = "fused-kernels"  # runs custom fused kernels (Triton/CUDA/C++) where available
PEFT_FORMAT = "peft-format"  # loads from and saves to PEFT adapter directories
IN_PLACE = "in-place"  # trains entries of the dense weight itself (no adapter branch)
CAPABILITIES = (SPARSE_DELTA, MERGE, UNMERGE, FUSED_KERNELS, PEFT_FORMAT, IN_PLACE)


@dataclass(frozen=True)
class MethodInfo:
    """One registered method.

    `sized(budget, seed)` builds the method's config at a comparable budget (trained columns for
    PaCA, adapter rank for LoRA/Hydra; S2FT uses fixed fractions), as benchmarks and demos compare
    methods; `lr` is a starting learning rate for AdamW at that size on small models.
    """

    name: str
    config: type[MethodConfig]
    glue: Method
    layers: tuple[type[nn.Module], ...]
    capabilities: frozenset[str]
    summary: str
    sized: Callable[[int, int], MethodConfig]
    lr: float = 1e-3

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


_METHODS: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    """Add a method; its name must be new and its config class must name it."""
    unknown = set(info.capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"method {info.name!r} declares unknown capabilities {sorted(unknown)}")
    if info.config.method != info.name:
        raise ValueError(f"{info.config.__name__}.method is {info.config.method!r}, not {info.name!r}")
    if info.name in _METHODS:
        raise ValueError(f"a slimtune method named {info.name!r} is registered already")
    _METHODS[info.name] = info
    return info


def methods() -> dict[str, MethodInfo]:
    """Every registered method, by name, in registration order."""
    return dict(_METHODS)


def get(name: str) -> MethodInfo:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"no slimtune method named {name!r}; known: {sorted(_METHODS)}") from None


def for_config(config: MethodConfig) -> MethodInfo:
    return get(config.method)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """The config a checkpoint's JSON describes (`{"method": name, **fields}`), checked."""
    return MethodConfig.from_dict(data, {name: info.config for name, info in _METHODS.items()})
