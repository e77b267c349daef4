"""What `apply` leaves on a model: its patch state, and the one step that installs a validated plan.

Kept apart from `patching` so that method glue, PEFT interop and sparse deltas can read and
install patch state without importing the public entry points (no import cycles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .config import MethodConfig
from .methods.base import Plan, Step
from .registry import for_config
from .transaction import Transaction

_STATE = "_slimtune_state"


@dataclass
class PatchState:
    """What `apply` did to a model: the config, the swapped module names, the prior grad flags."""

    config: MethodConfig
    modules: list[str]
    requires_grad: dict[str, bool] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


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
        built = []
        for replacement in plan.replacements:
            if replacement.writes is not None:
                transaction.keep_entries(model.get_submodule(replacement.name).weight, *replacement.writes)
            built.append((replacement.name, replacement.build()))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name, layer in built:
            layer.train(model.get_submodule(name).training)  # a new layer takes the replaced one's mode
            model.set_submodule(name, layer)
        setattr(model, _STATE, PatchState(config, [name for name, _ in built], requires_grad, plan.extra))
        if callable(getattr(model, "save_pretrained", None)):
            model.save_pretrained = RefuseSavePretrained(type(model).__name__, config.method)
    return model


class RefuseSavePretrained:
    """Stands in for `save_pretrained` on a patched model (also what `Trainer.save_model` calls): the
    dense weights alone would reload silently into a different model."""

    def __init__(self, model_class: str, method: str) -> None:
        self.model_class, self.method = model_class, method

    def __call__(self, *args, **kwargs):
        raise ValueError(
            f"{self.model_class} is patched by slimtune ({self.method}): save_pretrained would write "
            f"weights that reload into a different model. Save the fine-tune with slimtune.save(model, dir) "
            f"(reload with slimtune.load onto the base model), or call slimtune.merge(model) first and "
            f"save_pretrained the merged model"
        )


def clear(model: nn.Module) -> None:
    delattr(model, _STATE)
    model.__dict__.pop("save_pretrained", None)  # the class's own again


def patched_layers(model: nn.Module) -> dict[str, nn.Module]:
    state = require_patched(model)
    return {name: model.get_submodule(name) for name in state.modules}


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor a checkpoint of the patched model keeps, keyed by module name."""
    state = require_patched(model)
    return for_config(state.config).glue.checkpoint_tensors(patched_layers(model), state.extra)
