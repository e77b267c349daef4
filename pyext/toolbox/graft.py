"""Skill localisation by grafting (Panigrahi et al., "Task-Specific Skill Localization in Fine-tuned
Language Models", ICML 2023): the few parameters whose fine-tuned values, grafted onto the base,
recover most of what fine-tuning taught.

The graft of a mask gamma is base + gamma * (tuned - base). The mask is learned from the `sparsity`
share of entries that moved most, with a real-valued score per candidate entry optimised on task
data through a relaxed graft base + fraction(score) * (tuned - base). Two procedures:

- `authors` follows the authors' code (Skill-Localization-by-grafting, `graft_trainer.py`):
  fraction = s + (1 - 2 s) sigmoid(score - 10) with s the start region and scores uniform in [0, 1),
  so the search starts at the region (near-binary); each step is plain gradient descent on the
  loss averaged over `accumulate` batches (theirs: 128 batches of 8, 100 steps); an entry joins or
  leaves the mask when its fraction crosses 1/2, so the mask's size is free; after each step the
  rounded mask is scored and the best one over the steps is the result.
- `budget` (the default, as in runs made before the other existed): Adam on sigmoid(score) from +-3,
  one batch per step, and the final mask is exactly the `sparsity` share with the highest scores.

Departures from the authors' code in both: candidates are the entries of the targeted linears'
weights (theirs: every trainable parameter); the scores live on those entries only, in float32,
beside the two models; the best mask is the one with the lowest task loss on the `accumulate`
batches after each step (theirs: the highest train + validation accuracy); a causal-LM loss on the
stage's rows (theirs: prompt-based classification); the default `lr` of `authors` is ours (1e7,
the step a slope of 4.5e-5 at the start needs; their scripts take it as an argument).

The result is a `slimtune.SparseDelta` of scattered entries (apply, revert, `+`, save, load), so a
localised skill composes with the other diffs; `overlap` compares the regions of two skills.
`task_loss(batch)` gives the `loss` that `localize` optimises for one batch of causal-LM rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..sparse_delta import ENTRIES, DeltaEntry, SparseDelta
from ..targets import match_targets


def _weights(model: nn.Module, target_modules) -> dict[str, nn.Parameter]:
    return {f"{name}.weight": module.weight for name, module in match_targets(model, target_modules)}


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


def graft_diff(base: nn.Module, tuned: nn.Module, masks: dict[str, Tensor]) -> SparseDelta:
    """The grafted entries as an entry-level diff: applied to `base`, it gives the graft."""
    tuned_params = dict(tuned.named_parameters())
    entries = {}
    for name, mask in masks.items():
        index = mask.flatten().nonzero().flatten().cpu()
        change = tuned_params[name].detach().double() - base.get_parameter(name).detach().double()
        entries[name] = DeltaEntry(ENTRIES, index, change.flatten().cpu()[index])
    return SparseDelta(entries)


PROCEDURES = ("budget", "authors")
AUTHORS_LR = 1e7  # plain gradient descent on scores whose sigmoid starts at slope 4.5e-5 needs a large step


def localize(
    base: nn.Module,
    tuned: nn.Module,
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    sparsity: float = 1e-4,
    steps: int = 50,
    lr: float | None = None,
    target_modules="all-linear",
    procedure: str = "budget",
    accumulate: int = 1,
    seed: int = 0,
) -> tuple[SparseDelta, dict[str, Tensor]]:
    """Learn the graft region of a fine-tune: (its diff, its masks by parameter name).

    `loss(model, params)` is the task loss of `model` run with the parameters `params` substituted
    (use `torch.func.functional_call(model, params, ...)`; each call may take a new batch);
    `sparsity` is the share of the targeted entries the search starts from (the paper works at about
    1e-4 of all parameters). `procedure`: "budget" (Adam on scores, `steps` batches, the final mask
    exactly `sparsity` of the entries; lr 0.1 by default) or "authors" (the authors' code: a
    near-binary start, plain gradient descent on the loss averaged over `accumulate` batches per
    step, flips that let the mask grow or shrink, and the rounded mask with the lowest loss over the
    steps; lr 1e7 by default). The module docstring lists what differs from the authors' code.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity is the share of entries kept, in [0, 1]; got {sparsity}")
    if procedure not in PROCEDURES:
        raise ValueError(f"graft procedure {procedure!r} is not one of {', '.join(PROCEDURES)}")
    weights = _weights(base, target_modules)
    tuned_params = dict(tuned.named_parameters())
    delta = {name: (tuned_params[name].detach() - w.detach()).float() for name, w in weights.items()}
    start = _top_mask({name: d.abs() for name, d in delta.items()}, sparsity)
    relaxed = _Relaxed(base, weights, delta, loss)
    if procedure == "budget":
        masks = _budget(relaxed, start, sparsity, steps, 0.1 if lr is None else lr)
    else:
        masks = _authors(relaxed, start, steps, AUTHORS_LR if lr is None else lr, accumulate, seed)
    return graft_diff(base, tuned, masks), masks


class _Relaxed:
    """The task loss of base + fraction * (tuned - base) on the targeted weights, any fraction."""

    def __init__(
        self, base: nn.Module, weights: dict[str, nn.Parameter], delta: dict[str, Tensor], loss
    ) -> None:
        self.base, self.weights, self.delta, self.loss = base, weights, delta, loss
        self.frozen = {name: p.detach() for name, p in base.named_parameters()}

    def __call__(self, fractions: dict[str, Tensor]) -> Tensor:
        params = dict(self.frozen)
        for name, weight in self.weights.items():
            params[name] = (weight.detach().float() + fractions[name] * self.delta[name]).to(weight.dtype)
        return self.loss(self.base, params)


def _budget(
    relaxed: _Relaxed, start: dict[str, Tensor], sparsity: float, steps: int, lr: float
) -> dict[str, Tensor]:
    """Adam on a score per entry through sigmoid(score), from +-3 (0.95 inside the start region, 0.05
    outside); the final mask is the `sparsity` share of entries with the highest scores."""
    scores = {name: torch.where(m, 3.0, -3.0).requires_grad_(True) for name, m in start.items()}
    optimizer = torch.optim.Adam(list(scores.values()), lr=lr)
    for _ in range(steps):
        value = relaxed({name: torch.sigmoid(score) for name, score in scores.items()})
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return _top_mask({name: s.detach() for name, s in scores.items()}, sparsity)


def _authors(
    relaxed: _Relaxed, start: dict[str, Tensor], steps: int, lr: float, accumulate: int, seed: int
) -> dict[str, Tensor]:
    """The authors' search: fraction = s + (1 - 2 s) sigmoid(score - 10) with s the start region and
    scores drawn uniform in [0, 1) (so the relaxed mask starts within 1.2e-4 of the region); each
    step descends the loss averaged over `accumulate` batches, then the rounded mask (fraction above
    1/2) is scored on the next `accumulate` batches and the best one so far is kept."""
    generator = torch.Generator().manual_seed(seed)
    scores = {
        n: torch.rand(m.shape, generator=generator).to(m.device).requires_grad_(True)
        for n, m in start.items()
    }
    region = {name: m.float() for name, m in start.items()}

    def fractions() -> dict[str, Tensor]:
        return {n: region[n] + (1 - 2 * region[n]) * torch.sigmoid(scores[n] - SIGMOID_BIAS) for n in scores}

    def rounded_loss(masks: dict[str, Tensor]) -> float:
        with torch.no_grad():
            return (
                sum(float(relaxed({n: m.float() for n, m in masks.items()})) for _ in range(accumulate))
                / accumulate
            )

    best, best_loss = {name: m.clone() for name, m in start.items()}, math.inf  # as theirs: the start
    for _ in range(steps):  # region itself is no candidate (it stands only if no step ran)
        for _ in range(accumulate):
            (relaxed(fractions()) / accumulate).backward()
        with torch.no_grad():
            for score in scores.values():
                score -= lr * score.grad
                score.grad = None
            masks = {name: fraction > 0.5 for name, fraction in fractions().items()}
        value = rounded_loss(masks)
        if value < best_loss:
            best, best_loss = masks, value
    return best


SIGMOID_BIAS = 10.0  # the authors' `sigmoid_bias`


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


def recovered(start: float, tuned: float, grafted: float) -> float | None:
    """The share of the fine-tune's change in a score that the graft recovers (None: no change)."""
    return (grafted - start) / (tuned - start) if tuned != start else None


def diff_overlap(first: SparseDelta, second: SparseDelta) -> dict[str, float]:
    """`overlap` of two grafts' regions, from their diffs' (scattered) entries."""
    shared = sum(
        int(torch.isin(entry.index, second.entries[name].index).sum())
        for name, entry in first.entries.items()
        if name in second.entries
    )
    one = sum(entry.count for entry in first.entries.values())
    return _shares(shared, one, sum(entry.count for entry in second.entries.values()))
