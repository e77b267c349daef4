"""Copies of a model's parameters: what a stage's change is measured against (LiNeS, FPF's drift,
LT-SFT's movement)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Every parameter back to its copy in `saved`, in place."""
    for name, parameter in model.named_parameters():
        parameter.copy_(saved[name])
