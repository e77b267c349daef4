"""Patch a model in place (`apply`), inspect it, and turn it back into plain modules (`merge`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .config import MethodConfig
from .methods import Plan, method_for

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


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (e.g. a transformers model), got {type(model).__name__}")
    state = patch_state(model)
    if state is not None:
        raise ValueError(
            f"{type(model).__name__} is already patched by slimtune ({state.config.method}, "
            f"{len(state.modules)} modules); call slimtune.merge(model) first, or start from a fresh model"
        )


def apply(model: nn.Module, config: MethodConfig) -> nn.Module:
    """Swap the targeted modules of `model` in place for the method's layers and freeze the rest.

    Every check runs before the first change, so a refused call leaves the model exactly as it was.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(
            f"expected a slimtune config such as slimtune.PaCAConfig, got {type(config).__name__}"
        )
    _check_model(model)
    return commit(model, config, method_for(config).plan(model, config))


def commit(model: nn.Module, config: MethodConfig, plan: Plan) -> nn.Module:
    """Carry out a validated plan: prepare, build every layer, then swap and freeze."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    if plan.prepare is not None:
        plan.prepare()
    built = [(r.name, r.build()) for r in plan.replacements]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, layer in built:
        model.set_submodule(name, layer)
    setattr(model, _STATE, PatchState(config, [name for name, _ in built], requires_grad, plan.extra))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: exactly those the method trains."""
    require_patched(model)
    return [p for p in model.parameters() if p.requires_grad]


def patched_layers(model: nn.Module) -> dict[str, nn.Module]:
    state = require_patched(model)
    return {name: model.get_submodule(name) for name in state.modules}


def merge(model: nn.Module) -> nn.Module:
    """Replace every slimtune layer by a plain module holding the trained weights (same outputs).

    Parameters get back the `requires_grad` flags they had before `apply`.
    """
    state = require_patched(model)
    layers = patched_layers(model)
    method_for(state.config).unpatch(model, layers, state.extra)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(state.requires_grad.get(name, True))
    delattr(model, _STATE)
    return model


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor a checkpoint of the patched model keeps, keyed by module name."""
    state = require_patched(model)
    return method_for(state.config).checkpoint_tensors(patched_layers(model), state.extra)
