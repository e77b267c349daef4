"""The trainer's `graft` operation carried out on a stage: the search itself is
`slimtune.toolbox.graft` (see there for the procedures and where they follow the authors); this
module feeds it the stage's data and scores the graft on the tasks the stage teaches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from slimtune.toolbox import graft as localisation
from torch import Tensor, nn

from .data import Packed, batch_order

if TYPE_CHECKING:
    from .operations import Graft
    from .stages import StageRun

GRAFT_FILE = "graft.safetensors"
log = logging.getLogger("slimtune.train")


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
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        return localisation.task_loss(batch)(model, params)

    return loss


def localise(settings: Graft, here: StageRun) -> dict[str, Any]:
    """Localise the stage's skill: save it as the stage's `graft.safetensors` diff and score the
    graft against the stage's start and its fine-tune on the tasks the stage teaches (ValueError
    for settings the model cannot take)."""
    model, recipe = here.prepared.model, here.recipe
    start = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in start.named_parameters():
            parameter.copy_(here.start[name])
    loss = data_loss(here.prepared.packed[here.index], settings.batch_size, here.seed + 7)
    diff, masks = localisation.localize(
        start, model, loss, settings.sparsity, settings.steps, settings.lr, settings.target_modules,
        settings.procedure, settings.accumulate, here.seed + 11,
    )  # fmt: skip
    if here.world.rank == 0:
        here.run.stage(here.index).mkdir(parents=True, exist_ok=True)
        diff.save(here.run.stage(here.index) / GRAFT_FILE)
    taught = [j for j, t in enumerate(recipe.tasks) if here.stage.name in t.stages]
    scores = {"start": here.scores(start, taught), "tuned": here.scores(model, taught)}
    diff.apply(start)
    scores["graft"] = here.scores(start, taught)
    if settings.apply:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(start.get_parameter(name))
    entries = sum(int(m.sum()) for m in masks.values())
    tasks = {recipe.tasks[j].name: _recovery(scores, j) for j in taught}
    log.info("stage %s: graft of %d entries: %s", here.stage.name, entries, tasks)
    return {
        "entries": entries,
        "share": entries / sum(m.numel() for m in masks.values()),
        "applied": settings.apply,
        "tasks": tasks,
    }


def _recovery(scores: dict[str, dict[int, dict[str, float | None]]], task: int) -> dict[str, Any]:
    """A task's accuracy and loss at the start, after the fine-tune and the graft, and the share recovered."""
    return {
        kind: {state: scores[state][task][kind] for state in scores}
        | {"recovered": localisation.recovered(*(scores[state][task][kind] for state in scores))}
        for kind in ("accuracy", "loss")
        if scores["tuned"][task][kind] is not None
    }
