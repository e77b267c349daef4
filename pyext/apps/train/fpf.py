"""FPF and k-FPF: forgetting-prioritised fine-tuning (Zhao et al., "Does Continual Learning Equally
Forget All Parameters?", ICML 2023).

The paper finds that a few modules change far more between tasks than the rest, attributes
forgetting to them, and fine-tunes only those on a small replay buffer: once at the end of a
sequence (FPF, a post operation here) or k times during training without any other replay (k-FPF,
a stage option). The modules are chosen by `slimtune.toolbox.fpf` (listed, or `auto`: the `top`
by mean drift over the stages so far); the settings are the `fpf` operation's (`operations.FPF`);
this module holds the replay buffer (`buffer` rows drawn evenly from the training data of every
stage so far, the current one included) and the FPF step on the trainer's loop.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import slimtune
import torch
from torch import nn

from . import loop
from .data import Packed, batch_order

if TYPE_CHECKING:
    from .operations import FPF


def choose(model: nn.Module, fpf: FPF, drifts: list[dict[str, float]]) -> list[str]:
    """The modules an FPF operation trains (`slimtune.toolbox.fpf.choose` with its settings)."""
    return slimtune.toolbox.fpf.choose(model, fpf.modules, fpf.top, drifts)


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
    params = slimtune.toolbox.fpf.parameters(model, modules)
    chosen = {id(p) for p in params}
    flags = {id(p): p.requires_grad for p in model.parameters()}
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
