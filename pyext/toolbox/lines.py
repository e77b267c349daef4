"""LiNeS (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging", ICLR 2025): after fine-tuning, scale each parameter's change by a factor that grows with
its block's depth, alpha + beta * l / (L - 1), so the shallow blocks, which hold the most general
features, keep the most of the base model.

    before = slimtune.toolbox.lines.snapshot(model)   # at the stage's start
    ...train...
    slimtune.toolbox.lines.scale(model, before, alpha=0.5, beta=0.5)
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..architectures import block_stacks
from .params import snapshot

__all__ = ["scale", "scales", "snapshot"]


def scales(model: nn.Module, alpha: float, beta: float) -> dict[str, float]:
    """Per parameter: alpha + beta * l / (L - 1) inside block l of L (a lone block counts as the last),
    alpha outside the blocks (embeddings, final norm, LM head)."""
    (prefix, blocks), *_ = block_stacks(model)
    depth = len(blocks)
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    factors = {}
    for name, _ in model.named_parameters():
        match = pattern.match(name)
        if match is None:
            factors[name] = alpha
        else:
            factors[name] = alpha + beta * (int(match[1]) / (depth - 1) if depth > 1 else 1.0)
    return factors


@torch.no_grad()
def scale(model: nn.Module, before: dict[str, Tensor], alpha: float, beta: float) -> None:
    """LiNeS in place: every parameter becomes before + factor * (now - before)."""
    for name, factor in scales(model, alpha, beta).items():
        parameter = model.get_parameter(name)
        parameter.copy_(before[name] + factor * (parameter - before[name]))
