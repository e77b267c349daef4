"""`slimtune train`: check everything, then train stage after stage, evaluating every task after each.

Each finished stage leaves its checkpoint (only what changed) and `result.json`; `--resume`
restores finished stages from them (redoing their deterministic operations) and trains the rest,
so an interrupted run loses at most the stage it was in.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import slimtune
import torch
from slimtune.toolbox import graft as localisation
from slimtune.toolbox.entry_diff import EntryDiff, load_diff
from torch import nn
from tqdm import tqdm

from .. import progress
from . import fpf, graft, loop, metrics, models, post, step_log
from .data import DataError, Packed, Source, as_form, batch_order, mix, pack, read_records, source_examples
from .recipe import Recipe, RecipeError, Stage, TaskSpec, load_recipe
from .stage_methods import DIFF_FILE, Context, StageMethod
from .tasks import Example, encode, evaluate, generate
from .tokenizer import ChatError, Tokenizer

log = logging.getLogger("slimtune.train")
SOFT_PROMPT = "soft_prompt.safetensors"  # beside an exported model with a soft prompt


@dataclass
class Prepared:
    """Everything a run needs, built and checked before the first step."""

    model: nn.Module
    tokenizer: Tokenizer
    packed: list[Packed]
    evals: list[tuple[list[Example], bool]]
    samples: dict[int, Packed] = field(default_factory=dict)  # CorDA's rows, by stage index
    prompts: dict[str, Any] = field(default_factory=dict)  # the soft prompt of each prompt stage so far


@dataclass
class RunResult:
    directory: Path
    model: nn.Module
    metrics: dict[str, Any] | None  # None on ranks other than 0


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
    """Refuse what only the model or the launch can reveal: a method the model cannot take, a diff
    file that is not one, a batch that does not split over the processes."""
    names = [s.name for s in recipe.stages]
    for stage in recipe.stages:
        try:
            stage.method().check(model)
        except ValueError as err:
            raise RecipeError(
                f"{stage.method_where}: {stage.method_name} cannot train this model: {err}"
            ) from None
        for settings in [stage.kfpf, *(op.fpf for op in stage.post)]:  # listed FPF modules must exist
            if settings is not None and settings.modules != fpf.AUTO:  # (auto is decided in the run)
                try:
                    fpf.choose(model, settings, [])
                except ValueError as err:
                    raise RecipeError(f"{settings.where}: {err}") from None
        for op in stage.post:
            if op.kind == "graft" and not any(stage.name in t.stages for t in recipe.tasks):
                raise RecipeError(
                    f"{op.where}: graft scores the skill on the tasks the stage teaches; give a task "
                    f"`stage: {stage.name}`"
                )
        for op in (*stage.pre, *stage.post):
            if op.target and op.target not in names:
                try:
                    load_diff(op.target)
                except (OSError, ValueError) as err:
                    raise RecipeError(f"{op.where}: {err}") from None
        if stage.batch_size % (stage.grad_accum * world.size):
            raise RecipeError(
                f"{stage.where}.batch_size: {stage.batch_size} rows do not split into grad_accum="
                f"{stage.grad_accum} micro-batches on each of {world.size} processes"
            )


def _check_kfpf(recipe: Recipe, packed: list[Packed]) -> None:
    """k-FPF runs k times at distinct steps of its stage: refuse a k the stage's steps (known once its
    data is packed) cannot hold, instead of running fewer."""
    for stage, rows in zip(recipe.stages, packed, strict=True):
        steps = _steps(stage, len(rows))
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


def stage_folder(root: Path, index: int, name: str) -> Path:
    """Where stage `index` (0-based) named `name` keeps its checkpoint and result in run folder `root`."""
    return root / "stages" / f"{index + 1:02d}-{name}"


class RunDir:
    """The run's folder: the recipe it belongs to, each stage's checkpoint and result, logs, reports."""

    def __init__(
        self,
        root: Path,
        recipe: Recipe,
        resume: bool,
        world: loop.World,
        changed_data: bool = False,
        tensorboard: bool = False,
    ) -> None:
        self.root, self.recipe, self.tensorboard = root, recipe, tensorboard
        if root.exists() and not root.is_dir():
            raise RecipeError(f"--output {root} is a file, not a folder: choose a folder for the run")
        marker, data_marker = root / "recipe.json", root / "data.json"
        trained = {k: v for k, v in recipe.data.items() if k != "log"}  # where figures go is not the run
        current = json.loads(json.dumps(trained, sort_keys=True, default=str))
        digests = data_digests(recipe)
        if marker.exists():
            if not resume:
                raise RecipeError(
                    f"{root} already holds a run: pass --resume to continue it, or another --output"
                )
            if self.read(marker) != current:
                raise RecipeError(f"{root} holds a run of a different recipe: choose another --output")
            folder = recipe.file.resolve().parent  # older run folders keyed data by the path as given
            started = {str((folder / k).resolve()): v for k, v in (self.read(data_marker) or {}).items()}
            changed = sorted(p for p in digests if started.get(str((folder / p).resolve())) != digests[p])
            if changed and not changed_data:
                raise RecipeError(
                    f"{changed[0]}: the data changed since the run in {root} started (SHA-256 differs"
                    f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); restore it, or pass "
                    f"--resume --changed-data to go on with the new data"
                )
        world.barrier()  # every rank has read the markers before rank 0 writes them
        if world.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            slimtune.files.write_text(marker, json.dumps(current, indent=1) + "\n")
            slimtune.files.write_text(data_marker, json.dumps(digests, indent=1, sort_keys=True) + "\n")
            shutil.copyfile(recipe.file, root / "recipe.yaml")
        world.barrier()

    def stage(self, index: int) -> Path:
        return stage_folder(self.root, index, self.recipe.stages[index].name)

    def step_sinks(self, index: int) -> list[step_log.StepSink]:
        """Where stage `index`'s step figures go, started anew: its steps.csv, and its TensorBoard run."""
        board = self.root / step_log.TENSORBOARD / self.stage(index).name if self.tensorboard else None
        return step_log.sinks(self.stage(index), board)

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """A JSON file of the run folder (None if absent); RecipeError naming it if damaged."""
        if not path.exists():
            return None
        try:
            data = slimtune.files.read_json(path)
        except ValueError as err:
            raise RecipeError(
                f"{err}: the run folder is damaged; delete the file or choose another --output"
            ) from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path} holds no JSON object: the run folder is damaged")
        return data

    @staticmethod
    def write(path: Path, data: dict[str, Any]) -> None:
        """Atomically, so a result file exists only once complete (it marks a stage finished)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        slimtune.files.write_text(path, json.dumps(data, indent=1) + "\n")

    def diff_file(self, op: post.Operation) -> Path | None:
        names = [s.name for s in self.recipe.stages]
        if op.kind == "lines":
            return None
        return self.stage(names.index(op.target)) / DIFF_FILE if op.target in names else Path(op.target)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


@contextlib.contextmanager
def _logging(root: Path, rank: int) -> Iterator[None]:
    """Log to `train.log` in the run folder and to the console (above the progress bars); rank 0 only."""
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers = [logging.FileHandler(root / "train.log"), _TqdmHandler()]
        handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    for handler in handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


def data_digests(recipe: Recipe) -> dict[str, str]:
    """SHA-256 of every data file the recipe reads (a dataset folder: of all its files), by path
    relative to the recipe's folder."""
    paths = [s.path for stage in recipe.stages for s in stage.data if s.path is not None]
    paths += [t.path for t in recipe.tasks if t.path is not None]
    digests = {}
    for path in paths:
        hasher = hashlib.sha256()
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                hasher.update(str(file.relative_to(path) if path.is_dir() else "").encode())
                with file.open("rb") as handle:
                    for block in iter(lambda h=handle: h.read(1 << 20), b""):
                        hasher.update(block)
        # Keyed by the path from the recipe's folder: the same whatever the working directory.
        digests[os.path.relpath(path.resolve(), recipe.file.resolve().parent)] = hasher.hexdigest()
    return digests


def evaluate_all(recipe: Recipe, prepared: Prepared) -> dict[str, dict[str, float | None]]:
    return {
        task.name: _evaluate(prepared, task, *evals)
        for task, evals in zip(recipe.tasks, prepared.evals, strict=True)
    }


def _evaluate(
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
    start: dict[str, torch.Tensor] | None = None

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.index]

    @property
    def seed(self) -> int:
        return stage_seed(self.recipe.seed, self.stage.name)

    def drifts(self, current: dict[str, float] | None = None) -> list[dict[str, float]]:
        """The module drifts of the stages so far on this branch (FPF's `auto`)."""
        return [r["drift"] for r in self.history if r.get("drift")] + ([current] if current else [])

    def fpf(self, settings: fpf.FPF, drift: dict[str, float] | None, salt: int) -> dict[str, Any]:
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
    for op in stage.pre:
        _operate(op, model, None, run)
    here = StageRun(recipe, index, prepared, world, history or [])
    if recipe.uses_fpf() or any(op.kind in ("lines", "graft") for op in stage.post):
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
    _post_operations(here, run, drift, extra)
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


def _post_operations(
    here: StageRun, run: RunDir, drift: dict[str, float] | None, extra: dict[str, Any]
) -> None:
    """The stage's `post` operations in order; FPF and graft records go to `extra`."""
    for number, op in enumerate(here.stage.post):
        if op.kind == "fpf":
            extra.setdefault("fpf", []).append(here.fpf(op.fpf, drift, 1000 + number))
        elif op.kind == "graft":
            extra.setdefault("graft", []).append(_graft(here, op, run))
        else:
            _operate(op, here.prepared.model, here.start, run)


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
    steps = _steps(stage, len(packed))

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


def _graft(here: StageRun, op: post.Operation, run: RunDir) -> dict[str, Any]:
    """Localise the stage's skill (`graft`): save it as the stage's `graft.safetensors` entry diff
    and score the graft against the stage's start and its fine-tune on the tasks the stage teaches."""
    settings, model, recipe = op.graft, here.prepared.model, here.recipe
    start = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in start.named_parameters():
            parameter.copy_(here.start[name])
    loss = graft.data_loss(here.prepared.packed[here.index], settings.batch_size, here.seed + 7)
    try:
        diff, masks = localisation.localize(
            start, model, loss, settings.sparsity, settings.steps, settings.lr, settings.target_modules,
            settings.procedure, settings.accumulate, here.seed + 11,
        )  # fmt: skip
    except ValueError as err:
        raise RecipeError(f"{op.where}: {err}") from None
    if here.world.rank == 0:
        run.stage(here.index).mkdir(parents=True, exist_ok=True)
        diff.save(run.stage(here.index) / graft.GRAFT_FILE)
    taught = [j for j, t in enumerate(recipe.tasks) if here.stage.name in t.stages]
    scores = {"start": _scores(here, start, taught), "tuned": _scores(here, model, taught)}
    diff.apply(start)
    scores["graft"] = _scores(here, start, taught)
    if settings.apply:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(start.get_parameter(name))
    entries = sum(int(m.sum()) for m in masks.values())
    tasks = {}
    for j in taught:
        tasks[recipe.tasks[j].name] = {
            kind: {state: scores[state][j][kind] for state in scores}
            | {"recovered": localisation.recovered(*(scores[state][j][kind] for state in scores))}
            for kind in ("accuracy", "loss")
            if scores["tuned"][j][kind] is not None
        }
    log.info("stage %s: graft of %d entries: %s", here.stage.name, entries, tasks)
    return {
        "entries": entries,
        "share": entries / sum(m.numel() for m in masks.values()),
        "applied": settings.apply,
        "tasks": tasks,
    }


def _scores(here: StageRun, model: nn.Module, tasks: list[int]) -> dict[int, dict[str, float | None]]:
    prepared, recipe = here.prepared, here.recipe
    return {j: _evaluate(prepared, recipe.tasks[j], *prepared.evals[j], model=model) for j in tasks}


def _operate(
    op: post.Operation, model: nn.Module, before: dict[str, torch.Tensor] | None, run: RunDir
) -> None:
    """One pre- or post-stage operation; a diff that does not fit the model is a recipe error."""
    try:
        post.run(op, model, before, run.diff_file(op))
    except ValueError as err:
        raise RecipeError(f"{op.where}: {err}") from None


def _steps(stage: Stage, rows: int) -> int:
    return stage.steps or math.ceil(stage.epochs * rows / stage.batch_size)


def _brief(results: dict[str, dict[str, float | None]]) -> str:
    return ", ".join(
        f"{task} acc {r['accuracy']:.3f}" if r["accuracy"] is not None else f"{task} loss {r['loss']:.3f}"
        for task, r in results.items()
    )


def _branch_metrics(recipe: Recipe, acc: metrics.Matrix, leaf: int) -> dict[str, Any]:
    """Forgetting metrics along the stages that led to stage `leaf` (all of them in a linear recipe)."""
    rows = recipe.lineage(leaf)
    names = [recipe.stages[j].name for j in rows]
    learned = [next((k for k, name in enumerate(names) if name in t.stages), None) for t in recipe.tasks]
    return metrics.forgetting([acc[j] for j in rows], [t.name for t in recipe.tasks], learned)


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


def export_hf(model: nn.Module, tokenizer: Tokenizer, folder: Path) -> Path:
    """`save_pretrained` of the (plain, merged) model and its tokenizer, written to a temporary folder
    and renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        if slimtune.prompt.attached(model) is not None:  # not part of the HF weights: saved beside them
            slimtune.prompt.save(model, partial / SOFT_PROMPT)
        save = getattr(tokenizer, "save", None)
        if save is not None:
            save(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _graft_summary(names: list[str], records: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """Each grafted stage's last graft, and the pairwise overlap of the stages' regions."""
    grafted = [(j, r["graft"][-1]) for j, r in enumerate(records) if r.get("graft")]
    if not grafted:
        return {}
    folders = {j: stage_folder(root, j, names[j]) / graft.GRAFT_FILE for j, _ in grafted}
    diffs = {j: EntryDiff.load(path) for j, path in folders.items() if path.exists()}
    overlap = {
        f"{names[a]}|{names[b]}": localisation.diff_overlap(diffs[a], diffs[b])
        for a in diffs
        for b in diffs
        if a < b
    }
    return {"grafts": {names[j]: record for j, record in grafted}, "graft_overlap": overlap}


def report(
    recipe: Recipe, base: dict[str, Any], records: list[dict[str, Any]], root: Path, tensorboard: bool = False
) -> dict[str, Any]:
    """metrics.json, forgetting.png, losses.png and summary.txt (and the `evaluation` TensorBoard run);
    prints the summary table."""
    tasks, names = [t.name for t in recipe.tasks], [s.name for s in recipe.stages]
    rows = [base, *(r["eval"] for r in records)]
    acc = [[row[t]["accuracy"] for t in tasks] for row in rows]
    loss = [[row[t]["loss"] for t in tasks] for row in rows]
    branches = {names[leaf]: _branch_metrics(recipe, acc[1:], leaf) for leaf in recipe.leaves()}
    data = {
        "tasks": tasks,
        "stages": names,
        "base": {"accuracy": acc[0], "loss": loss[0]},
        "accuracy": acc[1:],
        "loss": loss[1:],
        **branches[names[-1]],
        "branches": branches,
        **({"intruders": metrics.intruder_summary(names, records)} if recipe.intruders else {}),
        **_graft_summary(names, records, root),
        "training": [
            {"stage": r["stage"], "steps": len(r["losses"]), "final_loss": r["losses"][-1]}
            | {k: r[k] for k in ("ms_per_step", "memory_mib")}
            for r in records
        ],
    }
    slimtune.files.write_text(root / "metrics.json", json.dumps(data, indent=1) + "\n")
    labels = ["base", *names]
    title = recipe.description or recipe.file.stem
    metrics.heatmap(labels, tasks, acc, root / "forgetting.png", loss, f"{title}: accuracy after each stage")
    parents = [recipe.parent(j) for j in range(len(names))]
    metrics.loss_curves(names, [r["losses"] for r in records], root / "losses.png", parents, title)
    if recipe.intruders:
        metrics.intruder_plot(data["intruders"], root / "intruders.png", title)
    if tensorboard:
        step_log.write_evaluations(root / step_log.TENSORBOARD / "evaluation", labels, tasks, acc, loss)
    text = metrics.table(labels, tasks, acc, loss, branches)
    slimtune.files.write_text(root / "summary.txt", text + "\n")
    print(text)
    return data


def run(
    recipe_path: str | Path,
    output: str | Path | None = None,
    resume: bool = False,
    changed_data: bool = False,
    export_hf: bool = False,
    report_to: str | None = None,
) -> RunResult:
    """Train a recipe end to end; RecipeError (before any training) for a bad recipe or run folder.

    `resume` continues the run in `output`; its data must be what the run started with unless
    `changed_data`. `export_hf` writes each branch's final model to `export/<stage>/` as a plain
    Hugging Face directory. `report_to` ("tensorboard" or "none") overrides the recipe's `log`."""
    recipe = load_recipe(recipe_path)
    tensorboard = recipe.log.tensorboard if report_to is None else report_to == "tensorboard"
    if tensorboard:
        step_log.check_tensorboard("--report-to tensorboard" if report_to else str(recipe.file))
    root = Path(output) if output is not None else Path("runs") / recipe.file.stem
    world = loop.World.start(recipe.device)
    if world.rank == 0:
        print(f"slimtune train: {recipe.file} -> run folder {root}", file=sys.stderr, flush=True)
    prepared = prepare(recipe, world)
    run_dir = RunDir(root, recipe, resume, world, changed_data, tensorboard)
    with _logging(root, world.rank):
        log.info("run %s: %s, %d stages, %d tasks", root, recipe.file, len(recipe.stages), len(recipe.tasks))
        base = run_dir.read(root / "base.json") or {}
        missing = [j for j, task in enumerate(recipe.tasks) if task.name not in base]
        if missing and world.rank == 0:  # a base evaluation given beside the run may lack some tasks
            base |= {
                recipe.tasks[j].name: _evaluate(prepared, recipe.tasks[j], *prepared.evals[j])
                for j in missing
            }
            run_dir.write(root / "base.json", base)
        records = train_stages(recipe, prepared, run_dir, world, export_hf)
        data = report(recipe, base, records, root, tensorboard) if world.rank == 0 else None
    return RunResult(root, prepared.model, data)


def main(args: argparse.Namespace) -> int:
    """`slimtune train RECIPE [--output DIR] [--resume]`: a bad recipe is one message and exit code 2;
    a file that cannot be written mid-run (a full disk) is one message and exit code 1."""
    try:
        if args.changed_data and not args.resume:
            raise RecipeError("--changed-data goes with --resume (it lets a resumed run use changed data)")
        run(args.recipe, args.output, args.resume, args.changed_data, args.export_hf, args.report_to)
    except RecipeError as err:
        print(f"slimtune train: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        resume = shlex.join(
            ["slimtune", "train", str(args.recipe), *(["--output", args.output] * bool(args.output))]
        )
        print(
            f"slimtune train: {err.strerror} writing {err.filename or 'the run folder'}: every finished "
            f"stage is kept; fix that and continue with `{resume} --resume`",
            file=sys.stderr,
        )
        return 1
    return 0
