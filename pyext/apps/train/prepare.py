"""Everything a run needs, built and checked before the first step: the model, every stage's
data, the evaluation sets; every refusal of a recipe that only the model or the data reveal."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import slimtune
from torch import nn

from . import loop, models
from .data import DataError, Packed, Source, as_form, mix, pack, read_records, source_examples
from .recipe import Recipe, Stage, TaskSpec
from .schema import RecipeError
from .tasks import Example, encode, generate
from .tokenizer import ChatError, Tokenizer

log = logging.getLogger("slimtune.train")


@dataclass
class Prepared:
    """Everything a run needs, built and checked before the first step."""

    model: nn.Module
    tokenizer: Tokenizer
    packed: list[Packed]
    evals: list[tuple[list[Example], bool]]
    samples: dict[int, Packed] = field(default_factory=dict)  # CorDA's rows, by stage index
    prompts: dict[str, Any] = field(default_factory=dict)  # the soft prompt of each prompt stage so far


def stage_seed(seed: int, stage: str) -> int:
    """The seed of a stage's data and method draws: from the recipe's seed and the stage's name, so a
    stage draws the same wherever it sits (a branch matches the same stage in a linear recipe)."""
    return slimtune.seeding.derived(seed, stage)


def _eval_set(task: TaskSpec, recipe: Recipe) -> tuple[list[Example], bool]:
    """A task's evaluation examples, and whether they have answers."""
    try:
        if task.task is not None:
            return as_form(generate(task.task, task.n, recipe.seed, split="eval"), task.form), True
        return read_records(task.path, task.n, task.form)
    except DataError as err:
        raise RecipeError(f"{task.where}: {err}") from None


def _check_stages(recipe: Recipe, model: nn.Module, world: loop.World) -> None:
    """Refuse what only the model or the launch can reveal: a method the model cannot take, an
    operation that would fail in the run (its `check`), a batch that does not split over the processes."""
    for stage in recipe.stages:
        try:
            stage.method().check(model)
        except ValueError as err:
            raise RecipeError(
                f"{stage.method_where}: {stage.method_name} cannot train this model: {err}"
            ) from None
        for operation in (*stage.pre, *stage.post, *([stage.kfpf] if stage.kfpf is not None else [])):
            try:
                operation.check(model, stage, recipe)
            except (OSError, ValueError) as err:
                raise RecipeError(f"{operation.where}: {err}") from None
        if stage.batch_size % (stage.grad_accum * world.size):
            raise RecipeError(
                f"{stage.where}.batch_size: {stage.batch_size} rows do not split into grad_accum="
                f"{stage.grad_accum} micro-batches on each of {world.size} processes"
            )


def _check_kfpf(recipe: Recipe, packed: list[Packed]) -> None:
    """k-FPF runs k times at distinct steps of its stage: refuse a k the stage's steps (known once its
    data is packed) cannot hold, instead of running fewer."""
    for stage, rows in zip(recipe.stages, packed, strict=True):
        steps = stage_steps(stage, len(rows))
        if stage.kfpf is not None and stage.kfpf.k > steps:
            raise RecipeError(
                f"{stage.kfpf.where}.k: {stage.kfpf.k} FPF steps do not fit the stage's {steps} training "
                f"steps (one at most after each); use k <= {steps}"
            )


def _mixed(sources: tuple[Source, ...], seed: int, earlier: dict[str, list[Example]]) -> list[Example]:
    """The sources' examples, weighted and mixed (a `stage` source reuses an earlier stage's mix)."""
    parts = []
    for source in sources:
        try:
            parts.append((source_examples(source, seed, earlier), source.weight))
        except DataError as err:
            raise RecipeError(f"{source.where}: {err}") from None
    return mix(parts, seed)


def _packed(examples: list[Example], tokenizer: Tokenizer, seq_len: int, where: str) -> Packed:
    """The examples packed into rows; a DataError becomes a RecipeError at `where`."""
    try:
        return pack(examples, tokenizer, seq_len)
    except DataError as err:
        raise RecipeError(f"{where}: {err}") from None


def _pack_stages(recipe: Recipe, tokenizer: Tokenizer) -> tuple[list[Packed], dict[int, Packed]]:
    """Every stage's data, read, mixed and packed; and the covariance rows of every CorDA stage
    (its `corda` data, or its own training rows)."""
    packed, samples, mixed = [], {}, {}
    for index, stage in enumerate(recipe.stages):
        seed = stage_seed(recipe.seed, stage.name)
        mixed[stage.name] = _mixed(stage.data, seed, mixed)
        packed.append(_packed(mixed[stage.name], tokenizer, recipe.seq_len, stage.where))
        if stage.uses_corda:
            rows = packed[-1]
            if stage.corda_data:
                corda = _mixed(stage.corda_data, seed + 1, mixed)
                rows = _packed(corda, tokenizer, recipe.seq_len, f"{stage.where}.corda")
            count = min(stage.corda_rows, len(rows))
            samples[index] = Packed(rows.ids[:count], rows.labels[:count], rows.mask[:count])
    return packed, samples


def prepare(recipe: Recipe, world: loop.World) -> Prepared:
    """Build the model, check every stage against it, and read all data: every refusal comes here."""
    try:
        model, tokenizer = models.build(recipe.model, recipe.seed)
    except Exception as err:  # any failure here comes from the recipe's model entry
        raise RecipeError(
            f"{recipe.model.where}: cannot build the model: {type(err).__name__}: {err}"
        ) from None
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and recipe.seq_len > positions:
        raise RecipeError(
            f"{recipe.file}: seq_len: {recipe.seq_len} exceeds the {positions} positions of the model; "
            f"use seq_len <= {positions}"
        )
    _check_stages(recipe, model, world)
    packed, samples = _pack_stages(recipe, tokenizer)
    _check_kfpf(recipe, packed)
    evals = [_eval_set(task, recipe) for task in recipe.tasks]
    for task, (examples, _) in zip(recipe.tasks, evals, strict=True):
        try:  # a chat task needs a tokenizer with a chat template: say so before training
            encode(examples[0], tokenizer)
        except ChatError as err:
            raise RecipeError(f"{task.where}: {err}") from None
    return Prepared(model.to(world.device).eval(), tokenizer, packed, evals, samples)


def stage_steps(stage: Stage, rows: int) -> int:
    return stage.steps or math.ceil(stage.epochs * rows / stage.batch_size)
