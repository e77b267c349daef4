"""FPF and k-FPF: forgetting-prioritised fine-tuning (Zhao et al., "Does Continual Learning Equally
Forget All Parameters?", ICML 2023).

The paper finds that a few modules change far more between tasks than the rest, attributes
forgetting to them, and fine-tunes only those on a small replay buffer: once at the end of a
sequence (FPF, a post operation here) or k times during training without any other replay (k-FPF,
a stage option). Its modules are picked from their training dynamics; here, for transformer
modules, a module's drift in a stage is the relative change of its own parameters over the stage,
||theta_end - theta_start|| / ||theta_start||, and `auto` picks the `top` modules by mean drift over
the stages so far (the paper's CNN study ranks layer groups by the same kind of change and picks
BN and the last FC layer; it has no transformer criterion to copy). The buffer is `buffer` rows
drawn evenly from the training data of every stage so far, the current one included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import Packed, batch_order

AUTO = "auto"


@dataclass(frozen=True)
class FPF:
    """One FPF operation (`fpf` after a stage) or a stage's k-FPF schedule (`kfpf`, `k` > 0)."""

    buffer: int = 32
    modules: str | tuple[str, ...] = AUTO
    top: int = 4
    steps: int = 20
    lr: float = 1e-4
    batch_size: int = 8
    k: int = 0
    where: str = ""


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


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


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


def choose(model: nn.Module, fpf: FPF, drifts: list[dict[str, float]]) -> list[str]:
    """The modules an operation trains: the listed ones (exact names or dotted suffixes), or with
    `auto` the `top` by mean drift over `drifts` (ties broken by name)."""
    names = list(owners(model))
    if fpf.modules != AUTO:
        chosen = [n for n in names if any(n == m or n.endswith(f".{m}") for m in fpf.modules)]
        missing = [m for m in fpf.modules if not any(n == m or n.endswith(f".{m}") for n in names)]
        if missing:
            raise ValueError(
                f"fpf modules {missing} match no module with parameters of {type(model).__name__}"
            )
        return chosen
    if not drifts:
        raise ValueError("fpf modules: auto needs the training dynamics of at least one stage")
    mean = {n: sum(d.get(n, 0.0) for d in drifts) / len(drifts) for n in names}
    return sorted(names, key=lambda n: (-mean[n], n))[: fpf.top]


def buffer(packs: list[Packed], size: int, seed: int) -> Packed:
    """`size` rows drawn evenly (seeded) from each of `packs`."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for i, pack in enumerate(packs):
        share = size // len(packs) + (i < size % len(packs))
        rows = torch.randperm(len(pack), generator=generator)[: max(share, 0)]
        parts.append((pack.ids[rows], pack.labels[rows], pack.mask[rows]))
    ids, labels, mask = (torch.cat([p[j] for p in parts]) for j in range(3))
    return Packed(ids, labels, mask)


def finetune(
    model: nn.Module, modules: list[str], rows: Packed, fpf: FPF, stage, world, seed: int
) -> list[float]:
    """Train only `modules` on `rows` (AdamW at `fpf.lr`, constant): the FPF step. The model's
    training mode and `requires_grad` flags are left as they were; returns the losses."""
    from . import loop  # loop imports the recipe, which imports this module

    owned = owners(model)
    chosen = {id(p) for m in modules for p in owned[m]}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    params = [p for p in model.parameters() if id(p) in chosen]
    mode = model.training
    settings = dataclasses.replace(
        stage, name=f"{stage.name}:fpf", lr=fpf.lr, batch_size=fpf.batch_size, grad_accum=1,
        schedule="constant", warmup_steps=0, weight_decay=0.0,
    )  # fmt: skip
    trace = loop.Trace()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        torch.manual_seed(seed)
        order = batch_order(len(rows), fpf.batch_size, fpf.steps, seed)
        loop.train(model, params, rows, order, settings, fpf.steps, world, trace)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(mode)
    return trace.losses
