"""Operations before or after a stage's training: LiNeS scaling, and adding or reverting sparse diffs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import slimtune
from torch import Tensor, nn

from .fpf import FPF
from .graft import Graft


@dataclass(frozen=True)
class Operation:
    """`lines` (alpha, beta), `add_diff` / `revert_diff` of `target` (a stage name or a diff file),
    `fpf` (its settings), or `graft` (its settings; the runner carries out these two)."""

    kind: str
    alpha: float = 0.5
    beta: float = 0.5
    target: str = ""
    where: str = ""
    fpf: FPF | None = None
    graft: Graft | None = None


def run(op: Operation, model: nn.Module, before: dict[str, Tensor] | None, diff_file: Path | None) -> None:
    """Carry out one operation; `before` is the model at the stage's start, `diff_file` the op's diff."""
    if op.kind == "lines":
        slimtune.toolbox.lines.scale(model, before, op.alpha, op.beta)
    elif op.kind == "add_diff":
        slimtune.load_delta(diff_file).apply(model)
    else:
        slimtune.load_delta(diff_file).revert(model)
