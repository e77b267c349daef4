"""Forgetting-prioritised fine-tuning (Zhao et al., "Does Continual Learning Equally Forget All
Parameters?", ICML 2023): a few modules change far more between tasks than the rest; fine-tuning
only those on a small replay buffer undoes much of the forgetting. These are the choices, for any
training loop; the fine-tuning itself is an ordinary loop over the chosen modules' parameters.

    start = slimtune.toolbox.params.snapshot(model)
    ...train a stage...
    drifts.append(slimtune.toolbox.fpf.drift(model, start))
    modules = slimtune.toolbox.fpf.choose(model, "auto", 4, drifts)
    params = slimtune.toolbox.fpf.parameters(model, modules)  # train these on the replay buffer

A module's drift in a stage is the relative change of its own parameters over the stage,
||theta_end - theta_start|| / ||theta_start|| (the paper ranks its CNNs' layer groups by the same
kind of change; it has no transformer criterion to copy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .params import snapshot

AUTO = "auto"
__all__ = ["AUTO", "choose", "drift", "owners", "parameters", "snapshot"]


def owners(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The modules that own parameters (each parameter once, by its owner), by name."""
    found: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            found[name] = own
    return found


@torch.no_grad()
def drift(model: nn.Module, start: dict[str, Tensor]) -> dict[str, float]:
    """Per module: the relative change of its own parameters since `start`."""
    params = {id(p): name for name, p in model.named_parameters()}
    result = {}
    for module, own in owners(model).items():
        moved = sum(float((p.double() - start[params[id(p)]].double()).square().sum()) for p in own)
        size = sum(float(start[params[id(p)]].double().square().sum()) for p in own)
        result[module] = math.sqrt(moved / size) if size else math.sqrt(moved)
    return result


def choose(
    model: nn.Module, modules: str | tuple[str, ...], top: int, drifts: list[dict[str, float]]
) -> list[str]:
    """The modules FPF trains: the listed ones (exact names or dotted suffixes), or with `auto` the
    `top` by mean drift over `drifts` (ties broken by name)."""
    names = list(owners(model))
    if modules != AUTO:
        chosen = [n for n in names if any(n == m or n.endswith(f".{m}") for m in modules)]
        missing = [m for m in modules if not any(n == m or n.endswith(f".{m}") for n in names)]
        if missing:
            raise ValueError(
                f"fpf modules {missing} match no module with parameters of {type(model).__name__}"
            )
        return chosen
    if not drifts:
        raise ValueError("fpf modules: auto needs the training dynamics of at least one stage")
    mean = {n: sum(d.get(n, 0.0) for d in drifts) / len(drifts) for n in names}
    return sorted(names, key=lambda n: (-mean[n], n))[:top]


def parameters(model: nn.Module, modules: list[str]) -> list[nn.Parameter]:
    """The chosen modules' own parameters (what an FPF step optimises), in the model's order."""
    found = owners(model)
    chosen = {id(p) for name in modules for p in found[name]}
    return [p for p in model.parameters() if id(p) in chosen]
