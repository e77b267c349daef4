"""What `apply` leaves on a model: its patch state, and the one step that installs a validated plan.

Kept apart from `patching` so that method glue, PEFT interop and sparse deltas can read and
install patch state without importing the public entry points (no import cycles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import full_modules
from .config import MethodConfig
from .methods.base import Plan, Step
from .registry import IN_PLACE, for_config
from .transaction import Transaction

_STATE = "_slimtune_state"


@dataclass
class PatchState:
    """What `apply` did to a model: the config, the swapped module names, the prior grad flags."""

    config: MethodConfig
    modules: list[str]
    requires_grad: dict[str, bool] = field(default_factory=dict)
    extra: Any = None  # the method's own record (`Plan.extra`), read only by its glue
    full_modules: list[str] = field(default_factory=list)  # trained in full (modules_to_save)
    load_hook: Any = None  # the handle of hf_model.install's load-state-dict pre-hook
    shard_hook: Any = None  # the handle of sharding.install's forward pre-hook (in-place, 4-bit)
    peft_config: dict[str, Any] | None = None  # the adapter config `load_peft` read (`save_peft` keeps it)


def patch_state(model: nn.Module) -> PatchState | None:
    return getattr(model, _STATE, None)


def require_patched(model: nn.Module, doing: str = "") -> PatchState:
    """The model's patch state, or a ValueError saying to call `apply` first."""
    state = patch_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not patched by slimtune{doing}; "
            f"call slimtune.apply(model, config) first"
        )
    return state


def check_unpatched(model: nn.Module) -> None:
    """A module that slimtune may patch: an nn.Module without a patch state."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (e.g. a transformers model), got {type(model).__name__}")
    state = patch_state(model)
    if state is not None:
        raise ValueError(
            f"{type(model).__name__} is already patched by slimtune ({state.config.method}, "
            f"{len(state.modules)} modules); call slimtune.merge(model) first, or start from a fresh model"
        )


def commit(model: nn.Module, config: MethodConfig, plan: Plan, before: Sequence[Step] = ()) -> nn.Module:
    """Carry out a validated plan, all or nothing: the `before` steps and the plan's, then build every
    layer, then swap and freeze. Any failure (an allocation included) rolls the model back."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with Transaction(model) as transaction:
        for step in (*before, *plan.steps):
            step.do()  # a step writes once, at its end: if it fails, it wrote nothing
            if step.undo is not None:
                transaction.on_rollback(step.undo)
        for parameter, value in plan.full_values:
            transaction.keep(parameter)
            with torch.no_grad():
                parameter.copy_(value)
        built = []
        for replacement in plan.replacements:
            if replacement.writes is not None:
                transaction.keep_entries(model.get_submodule(replacement.name).weight, *replacement.writes)
            built.append((replacement.name, replacement.build()))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in full_modules.parameters(model, plan.full_modules).values():
            parameter.requires_grad_(True)
        for name, layer in built:
            layer.train(model.get_submodule(name).training)  # a new layer takes the replaced one's mode
            model.set_submodule(name, layer)
        names = [name for name, _ in built]
        state = PatchState(config, names, requires_grad, plan.extra, plan.full_modules)
        setattr(model, _STATE, state)
    return model


class _Reads(dict):
    """A checkpoint's tensors that remember which keys the method's plan read."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def plan(model: nn.Module, config: MethodConfig, saved: dict[str, Tensor] | None = None) -> Plan:
    """The whole plan of `apply` (or `unmerge`, from `saved` adapters): the method's swaps and the
    modules trained in full, which keep the values they have."""
    plan = for_config(config).glue.plan(model, config, saved)
    plan.full_modules = full_modules.resolve(
        model, config.modules_to_save, [r.name for r in plan.replacements]
    )
    return plan


def plan_checkpoint(model: nn.Module, config: MethodConfig, saved: dict[str, Tensor], source: str) -> Plan:
    """The whole plan to restore `saved` onto `model`; refused if any saved tensor goes unread
    (a tensor no layer uses means the file belongs to another model or config, or was edited)."""
    reads = _Reads(saved)
    restore = plan(model, config, reads)
    restore.full_values = full_modules.saved_values(model, restore.full_modules, reads)
    unread = sorted(set(saved) - reads.read)
    if unread:
        raise ValueError(
            f"{source} holds tensors that no layer of this model reads ({unread[:4]}"
            f"{'...' if len(unread) > 4 else ''}): it belongs to another model or config, or is damaged"
        )
    return restore


def clear(model: nn.Module) -> None:
    delattr(model, _STATE)


def patched_layers(model: nn.Module) -> dict[str, nn.Module]:
    state = require_patched(model)
    return {name: model.get_submodule(name) for name in state.modules}


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor a checkpoint of the patched model keeps, keyed by module name."""
    state = require_patched(model)
    tensors = for_config(state.config).glue.checkpoint_tensors(patched_layers(model), state.extra)
    full = full_modules.parameters(model, state.full_modules)
    return {**tensors, **{key: parameter.detach() for key, parameter in full.items()}}


def duplicated_entries(model: nn.Module) -> int:
    """How many parameter elements repeat entries of a dense weight: an in-place method's trained
    tensors (PaCA's columns, S2FT's block) are entries of the weight they are written into."""
    state = require_patched(model)
    if not for_config(state.config).has(IN_PLACE):
        return 0
    layers = patched_layers(model).values()
    return sum(p.numel() for layer in layers for p in layer.parameters(recurse=False) if p.requires_grad)
