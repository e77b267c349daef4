"""The trainer's `graft` operation: its settings and data; the search itself is
`slimtune.toolbox.graft` (see there for the procedures and where they follow the authors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slimtune.toolbox.graft import PROCEDURES, task_loss
from torch import Tensor, nn

from .data import Packed, batch_order

__all__ = ["GRAFT_FILE", "PROCEDURES", "Graft", "data_loss"]

GRAFT_FILE = "graft.safetensors"


@dataclass(frozen=True)
class Graft:
    """The trainer's `graft` operation: localise what the stage taught (a share `sparsity` of the
    targeted entries, the mask optimised `steps` times at `lr` on batches of the stage's data) and
    report how much of it the graft recovers; `apply` continues from the graft, not the fine-tune."""

    sparsity: float = 1e-4
    steps: int = 50
    lr: float | None = None  # None: the procedure's default
    batch_size: int = 8
    procedure: str = "budget"
    accumulate: int = 1
    target_modules: str | tuple[str, ...] = "all-linear"
    apply: bool = False
    where: str = ""


def data_loss(packed: Packed, batch_size: int, seed: int) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """Like `task_loss`, on a new seeded batch of `packed`'s rows at every call."""
    order, calls = batch_order(len(packed), batch_size, 1, seed), [0]

    def loss(model: nn.Module, params: dict[str, Tensor]) -> Tensor:
        start = calls[0] * batch_size % len(order)
        rows = order[start : start + batch_size]
        if len(rows) < min(batch_size, len(order)):
            rows = order[:batch_size]
        calls[0] += 1
        device = next(iter(params.values())).device
        ids, labels, mask = (t[rows].to(device) for t in (packed.ids, packed.labels, packed.mask))
        return task_loss({"input_ids": ids, "labels": labels, "attention_mask": mask})(model, params)

    return loss
