"""Skill localisation by grafting (Panigrahi et al., "Task-Specific Skill Localization in Fine-tuned
Language Models", ICML 2023): the few parameters whose fine-tuned values, grafted onto the base,
recover most of what fine-tuning taught.

The graft of a mask gamma is base + gamma * (tuned - base). The mask is learned as in the paper: it
starts from the `sparsity` share of entries that moved most, a real-valued score per candidate
entry is optimised on task data through the relaxed graft base + sigmoid(score) * (tuned - base),
and the final mask is the `sparsity` share of entries with the highest scores. Departures from the
authors' code, for memory: candidates are the entries of the targeted linears' weights (the paper
scores every parameter), and the scores live on those entries only, in float32, beside the two
models (no optimizer state besides Adam's on the scores).

The result is an `EntryDiff` (apply, revert, `+`, save, load: the trainer's entry-level diff), so a
localised skill composes with the other diffs; `overlap` compares the regions of two skills.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import slimtune
import torch
from torch import Tensor, nn
from torch.func import functional_call

from .data import Packed, batch_order
from .diff import EntryDiff

GRAFT_FILE = "graft.safetensors"


@dataclass(frozen=True)
class Graft:
    """The trainer's `graft` operation: localise what the stage taught (a share `sparsity` of the
    targeted entries, the mask optimised `steps` times at `lr` on batches of the stage's data) and
    report how much of it the graft recovers; `apply` continues from the graft, not the fine-tune."""

    sparsity: float = 1e-4
    steps: int = 50
    lr: float = 0.1
    batch_size: int = 8
    target_modules: str | tuple[str, ...] = "all-linear"
    apply: bool = False
    where: str = ""


def _weights(model: nn.Module, target_modules) -> dict[str, nn.Parameter]:
    return {
        f"{name}.weight": module.weight
        for name, module in slimtune.targets.match_targets(model, target_modules)
    }


def _top_mask(values: dict[str, Tensor], share: float) -> dict[str, Tensor]:
    """A boolean mask per tensor selecting the `share` of all entries with the largest values (ties
    broken by position)."""
    flat = torch.cat([v.detach().flatten().float().cpu() for v in values.values()])
    keep = math.ceil(share * flat.numel()) if share > 0 else 0
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(keep).indices] = True
    masks, start = {}, 0
    for name, value in values.items():
        masks[name] = chosen[start : start + value.numel()].view(value.shape).to(value.device)
        start += value.numel()
    return masks


def graft_diff(base: nn.Module, tuned: nn.Module, masks: dict[str, Tensor]) -> EntryDiff:
    """The grafted entries as an entry-level diff: applied to `base`, it gives the graft."""
    tuned_params = dict(tuned.named_parameters())
    entries = {}
    for name, mask in masks.items():
        index = mask.flatten().nonzero().flatten().cpu()
        change = tuned_params[name].detach().double() - base.get_parameter(name).detach().double()
        entries[name] = (index, change.flatten().cpu()[index])
    return EntryDiff(entries)


def localize(
    base: nn.Module,
    tuned: nn.Module,
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    sparsity: float = 1e-4,
    steps: int = 50,
    lr: float = 0.1,
    target_modules="all-linear",
) -> tuple[EntryDiff, dict[str, Tensor]]:
    """Learn the graft region of a fine-tune: (its diff, its masks by parameter name).

    `loss(model, params)` is the task loss of `model` run with the parameters `params` substituted
    (use `torch.func.functional_call(model, params, ...)`); `sparsity` is the share of the targeted
    entries kept (the paper works at about 1e-4 of all parameters).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity is the share of entries kept, in [0, 1]; got {sparsity}")
    weights = _weights(base, target_modules)
    tuned_params = dict(tuned.named_parameters())
    delta = {name: (tuned_params[name].detach() - w.detach()).float() for name, w in weights.items()}
    start = _top_mask({name: d.abs() for name, d in delta.items()}, sparsity)
    # Scores start at +-3 (sigmoid 0.95 inside the initial region, 0.05 outside), as a soft version of it.
    scores = {name: torch.where(m, 3.0, -3.0).requires_grad_(True) for name, m in start.items()}
    optimizer = torch.optim.Adam(list(scores.values()), lr=lr)
    frozen = {name: p.detach() for name, p in base.named_parameters()}
    for _ in range(steps):
        params = dict(frozen)
        for name, weight in weights.items():
            params[name] = (weight.detach().float() + torch.sigmoid(scores[name]) * delta[name]).to(
                weight.dtype
            )
        value = loss(base, params)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    masks = _top_mask({name: s.detach() for name, s in scores.items()}, sparsity)
    return graft_diff(base, tuned, masks), masks


def overlap(first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, float]:
    """How two skills' regions overlap: shared entries over the union (Jaccard) and over each."""
    shared = sum(int((first[n] & second[n]).sum()) for n in first if n in second)
    return _shares(
        shared, sum(int(m.sum()) for m in first.values()), sum(int(m.sum()) for m in second.values())
    )


def _shares(shared: int, one: int, two: int) -> dict[str, float]:
    """Jaccard, and the shared share of each side, of regions of `one` and `two` entries."""
    union = one + two - shared
    return {
        "jaccard": shared / union if union else 0.0,
        "of_first": shared / one if one else 0.0,
        "of_second": shared / two if two else 0.0,
    }


def task_loss(batch: dict[str, Tensor]) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """The language-modelling loss on `batch` (input_ids, labels, attention_mask) with substituted
    parameters: what `localize` optimises the mask on."""

    def loss(model: nn.Module, params: dict[str, Tensor]) -> Tensor:
        return functional_call(model, params, args=(), kwargs=batch).loss

    return loss


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


def recovered(start: float, tuned: float, grafted: float) -> float | None:
    """The share of the fine-tune's change in a score that the graft recovers (None: no change)."""
    return (grafted - start) / (tuned - start) if tuned != start else None


def diff_overlap(first: EntryDiff, second: EntryDiff) -> dict[str, float]:
    """`overlap` of two grafts' regions, from their diffs' entries."""
    shared = sum(
        int(torch.isin(index, second.entries[name][0]).sum())
        for name, (index, _) in first.entries.items()
        if name in second.entries
    )
    one = sum(index.numel() for index, _ in first.entries.values())
    return _shares(shared, one, sum(index.numel() for index, _ in second.entries.values()))
