"""The stage loop: each stage trained (or restored from its checkpoint), its operations, its
evaluation; branches start from the stage they name."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from statistics import median
from typing import Any

import slimtune
import torch
from torch import nn

from .. import progress
from . import fpf, loop, step_log
from .data import batch_order
from .operations import FPF, Operation
from .prepare import Prepared, stage_seed, stage_steps
from .recipe import Recipe, Stage, TaskSpec
from .report import export_hf
from .run_folder import RunDir
from .schema import RecipeError
from .stage_methods import Context, StageMethod
from .tasks import Example, evaluate

log = logging.getLogger("slimtune.train")


def evaluate_all(recipe: Recipe, prepared: Prepared) -> dict[str, dict[str, float | None]]:
    return {
        task.name: evaluate_task(prepared, task, *evals)
        for task, evals in zip(recipe.tasks, prepared.evals, strict=True)
    }


def evaluate_task(
    prepared: Prepared, task: TaskSpec, examples: list[Example], answers: bool, model: nn.Module | None = None
) -> dict[str, float | None]:
    """One task, with the soft prompt it asks for (`prompt`: none, or a prompt stage's; before that
    stage has run, none)."""
    model = prepared.model if model is None else model
    shown = progress.bar(len(examples), f"evaluating {task.name}", quiet_s=10.0, leave=False)
    attached = contextlib.nullcontext()  # a task without `prompt` takes the model as it is
    if task.prompt is not None:
        attached = slimtune.prompt.using(model, prepared.prompts.get(task.prompt))
    try:
        with attached:
            return evaluate(
                model, prepared.tokenizer, examples, answers, match=task.match, progress=shown.update
            )
    finally:
        shown.close()


@dataclass
class StageRun:
    """One stage's place in the run: its recipe entry, the stages before it on its branch (their
    records) and what the model was when it started (where an operation needs it)."""

    recipe: Recipe
    index: int
    prepared: Prepared
    world: loop.World
    history: list[dict[str, Any]]
    run: RunDir
    start: dict[str, torch.Tensor] | None = None
    drift: dict[str, float] | None = None  # the modules' drift over the stage (where FPF asks for it)

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.index]

    @property
    def seed(self) -> int:
        return stage_seed(self.recipe.seed, self.stage.name)

    def drifts(self, current: dict[str, float] | None = None) -> list[dict[str, float]]:
        """The module drifts of the stages so far on this branch (FPF's `auto`)."""
        return [r["drift"] for r in self.history if r.get("drift")] + ([current] if current else [])

    def scores(self, model: nn.Module, tasks: list[int]) -> dict[int, dict[str, float | None]]:
        """The evaluation of `model` on the recipe's tasks numbered `tasks`."""
        prepared, recipe = self.prepared, self.recipe
        return {j: evaluate_task(prepared, recipe.tasks[j], *prepared.evals[j], model=model) for j in tasks}

    def fpf(self, settings: FPF, drift: dict[str, float] | None, salt: int) -> dict[str, Any]:
        """One FPF step on the buffer of the branch's data so far; its record."""
        modules = fpf.choose(self.prepared.model, settings, self.drifts(drift))
        packs = [self.prepared.packed[j] for j in self.recipe.lineage(self.index)]
        rows = fpf.buffer(packs, settings.buffer, self.seed + salt)
        losses = fpf.finetune(
            self.prepared.model, modules, rows, settings, self.stage, self.world, self.seed + salt
        )
        log.info(
            "stage %s: fpf on %d buffer rows, modules %s", self.stage.name, len(rows), ", ".join(modules)
        )
        return {"modules": modules, "buffer_rows": len(rows), "losses": losses}


def train_stage(
    recipe: Recipe,
    index: int,
    prepared: Prepared,
    run: RunDir,
    world: loop.World,
    base: nn.Module | None = None,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run one stage (or restore it if finished) with its operations; returns its result record
    (with the intruder dimensions against `base` where the recipe asks for them). `history`: the
    records of the earlier stages on this stage's branch."""
    stage, model = recipe.stages[index], prepared.model
    directory, method = run.stage(index), stage.method()
    done = run.read(directory / "result.json")
    here = StageRun(recipe, index, prepared, world, history or [], run)
    _operate(here, stage.pre, {})
    if recipe.uses_fpf() or any(op.needs_start for op in stage.post):
        here.start = slimtune.toolbox.params.snapshot(model)
    extra: dict[str, Any] = {}
    if done is not None:
        method.restore(model, directory)
        log.info("stage %s: restored from %s", stage.name, directory)
        drift = done.get("drift")
    else:
        trace, drift = _train_and_save(here, method, run, extra)
    if stage.method_name == "prompt":
        prepared.prompts[stage.name] = slimtune.prompt.attached(model)
    here.drift = drift
    _operate(here, stage.post, extra)
    if done is None:
        done = _record(here, trace, drift, extra, base)
        if world.rank == 0:
            run.write(directory / "result.json", done)
            log.info("stage %s: %s", stage.name, _brief(done["eval"]))
    world.barrier()
    return done


def _train_and_save(
    here: StageRun, method: StageMethod, run: RunDir, extra: dict[str, Any]
) -> tuple[loop.Trace, dict[str, float] | None]:
    """Train the stage (its step figures to its sinks), save its checkpoint, finish its method; the
    trace and the modules' drift (where FPF asks for it)."""
    model, directory = here.prepared.model, run.stage(here.index)
    sinks = run.step_sinks(here.index) if here.world.rank == 0 else []
    try:
        trace = _fit(here, method, extra, sinks)
    finally:
        for sink in sinks:
            sink.close()
    if here.world.rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        method.save(model, directory)
    method.finish(model)
    return trace, slimtune.toolbox.fpf.drift(model, here.start) if here.recipe.uses_fpf() else None


def _record(
    here: StageRun,
    trace: loop.Trace,
    drift: dict[str, float] | None,
    extra: dict[str, Any],
    base: nn.Module | None,
) -> dict[str, Any]:
    """A freshly trained stage's result: training figures, every task's evaluation (rank 0), drift,
    operation records and the intruder dimensions against `base` where the recipe asks for them."""
    recipe, first = here.recipe, here.world.rank == 0
    done = {
        "stage": here.stage.name,
        "losses": trace.losses,
        "ms_per_step": median(trace.ms),
        "memory_mib": trace.memory_mib,
        "eval": evaluate_all(recipe, here.prepared) if first else None,
        **({"drift": drift} if drift is not None else {}),
        **extra,
    }
    if recipe.intruders is not None and first:
        config = recipe.intruders
        done["intruders"] = slimtune.diagnostics.intruder_dimensions(
            base, here.prepared.model, config.k, config.threshold, config.target_modules
        )
    return done


def _fit(
    here: StageRun, method: StageMethod, extra: dict[str, Any], sinks: list[step_log.StepSink]
) -> loop.Trace:
    """Set the stage's method up and train (with its k-FPF steps, recorded in `extra`; each step's
    figures to `sinks`); every draw follows from the recipe seed and the stage name."""
    stage, model, world = here.stage, here.prepared.model, here.world
    packed, trace, seed = here.prepared.packed[here.index], loop.Trace(), here.seed
    torch.manual_seed(seed)
    steps = stage_steps(stage, len(packed))

    def train(params: list[nn.Parameter], count: int, after=None) -> None:
        order = batch_order(len(packed), stage.batch_size, count, seed)
        loop.train(model, params, packed, order, stage, count, world, trace, after, sinks)

    params = method.setup(model, Context(seed, train, here.prepared.samples.get(here.index)))
    after = None
    if stage.kfpf is not None:  # k evenly spaced FPF steps, the last at the end of the stage
        points = {math.ceil(steps * i / stage.kfpf.k) for i in range(1, stage.kfpf.k + 1)}

        def after(step: int) -> None:
            if step in points:
                record = here.fpf(stage.kfpf, slimtune.toolbox.fpf.drift(model, here.start), step)
                extra.setdefault("kfpf", []).append({"after_step": step, **record})

    train(params, steps, after)
    return trace


def _operate(here: StageRun, operations: tuple[Operation, ...], records: dict[str, Any]) -> None:
    """The stage's `pre` or `post` operations in order, their records into `records` by operation
    name; a ValueError (e.g. a diff that does not fit the model) is a recipe error at the operation."""
    for number, operation in enumerate(operations):
        try:
            record = operation.run(here, number)
        except ValueError as err:
            raise RecipeError(f"{operation.where}: {err}") from None
        if record is not None:
            records.setdefault(operation.name, []).append(record)


def _brief(results: dict[str, dict[str, float | None]]) -> str:
    return ", ".join(
        f"{task} acc {r['accuracy']:.3f}" if r["accuracy"] is not None else f"{task} loss {r['loss']:.3f}"
        for task, r in results.items()
    )


def train_stages(
    recipe: Recipe, prepared: Prepared, run: RunDir, world: loop.World, export: bool = False
) -> list[dict[str, Any]]:
    """Every stage in order; a stage `from` an earlier one starts from a copy of that stage's model.
    `export`: the model at the end of each branch is also written as a plain Hugging Face directory."""
    branch_points = {recipe.parent(j) for j in range(len(recipe.stages)) if recipe.parent(j) != j - 1}
    leaves = set(recipe.leaves())
    snapshots, records = {}, []
    base = copy.deepcopy(prepared.model) if recipe.intruders is not None else None  # to compare against
    if -1 in branch_points:  # some stage starts from the base model again
        snapshots[-1] = _snapshot(prepared.model)
    for index in range(len(recipe.stages)):
        if recipe.parent(index) != index - 1:
            _restore(prepared.model, snapshots[recipe.parent(index)])
        history = [records[j] for j in recipe.lineage(index)[:-1]]
        records.append(train_stage(recipe, index, prepared, run, world, base, history))
        if index in branch_points:
            snapshots[index] = _snapshot(prepared.model)
        if export and index in leaves and world.rank == 0:
            folder = run.root / "export" / recipe.stages[index].name
            export_hf(prepared.model, prepared.tokenizer, folder)
            log.info(
                "stage %s: exported the model to %s (transformers.from_pretrained loads it)",
                recipe.stages[index].name,
                folder,
            )
    return records


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    """The model's state and its soft prompt (frozen, so the object itself), to branch from."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, slimtune.prompt.attached(model)


def _restore(model: nn.Module, snapshot: tuple[dict[str, torch.Tensor], Any]) -> None:
    state, prompt = snapshot
    model.load_state_dict(state)
    slimtune.prompt.replace(model, prompt)
