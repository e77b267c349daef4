"""Operations before or after a stage's training: LiNeS scaling, and adding or reverting sparse diffs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import slimtune
import torch
from torch import Tensor, nn

from .diff import load_diff
from .fpf import FPF
from .graft import Graft


@dataclass(frozen=True)
class Op:
    """`lines` (alpha, beta), `add_diff` / `revert_diff` of `target` (a stage name or a diff file),
    `fpf` (its settings), or `graft` (its settings; the runner carries out these two)."""

    kind: str
    alpha: float = 0.5
    beta: float = 0.5
    target: str = ""
    where: str = ""
    fpf: FPF | None = None
    graft: Graft | None = None


def lines_scales(model: nn.Module, alpha: float, beta: float) -> dict[str, float]:
    """Per parameter: alpha + beta * l / (L - 1) inside block l of L (a lone block counts as the last),
    alpha outside the blocks (embeddings, final norm, LM head)."""
    (prefix, blocks), *_ = slimtune.architectures.block_stacks(model)
    depth = len(blocks)
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    scales = {}
    for name, _ in model.named_parameters():
        match = pattern.match(name)
        if match is None:
            scales[name] = alpha
        else:
            scales[name] = alpha + beta * (int(match[1]) / (depth - 1) if depth > 1 else 1.0)
    return scales


@torch.no_grad()
def lines(model: nn.Module, before: dict[str, Tensor], alpha: float, beta: float) -> None:
    """LiNeS: shrink the stage's change most in shallow blocks, which hold the most general features."""
    for name, scale in lines_scales(model, alpha, beta).items():
        parameter = model.get_parameter(name)
        parameter.copy_(before[name] + scale * (parameter - before[name]))


def run(op: Op, model: nn.Module, before: dict[str, Tensor] | None, diff_file: Path | None) -> None:
    """Carry out one operation; `before` is the model at the stage's start, `diff_file` the op's diff."""
    if op.kind == "lines":
        lines(model, before, op.alpha, op.beta)
    elif op.kind == "add_diff":
        load_diff(diff_file).apply(model)
    else:
        load_diff(diff_file).revert(model)
