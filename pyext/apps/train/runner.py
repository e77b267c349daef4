"""`slimtune train`: check everything, then train stage after stage, evaluating every task after each.

Each finished stage leaves its checkpoint (only what changed) and `result.json`; `--resume`
restores finished stages from them (redoing their deterministic operations) and trains the rest,
so an interrupted run loses at most the stage it was in.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import loop, step_log
from .prepare import prepare, stage_seed
from .recipe import load_recipe
from .report import report
from .run_folder import RunDir, logging_to, stage_folder
from .schema import RecipeError
from .stages import evaluate_all, evaluate_task, train_stages

__all__ = ["RunResult", "evaluate_all", "main", "prepare", "run", "stage_folder", "stage_seed"]

log = logging.getLogger("slimtune.train")


@dataclass
class RunResult:
    directory: Path
    model: nn.Module
    metrics: dict[str, Any] | None  # None on ranks other than 0


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
    if report_to == "tensorboard":  # the recipe's own `log` was checked when it was read
        step_log.check_tensorboard("--report-to tensorboard")
    root = Path(output) if output is not None else Path("runs") / recipe.file.stem
    world = loop.World.start(recipe.device, recipe.distributed)
    if world.rank == 0:
        print(f"slimtune train: {recipe.file} -> run folder {root}", file=sys.stderr, flush=True)
    prepared = prepare(recipe, world)
    run_dir = RunDir(root, recipe, resume, world, changed_data, tensorboard)
    with logging_to(root, world.rank):
        log.info("run %s: %s, %d stages, %d tasks", root, recipe.file, len(recipe.stages), len(recipe.tasks))
        base = run_dir.read(root / "base.json") or {}
        missing = [j for j, task in enumerate(recipe.tasks) if task.name not in base]
        if missing and world.rank == 0:  # a base evaluation given beside the run may lack some tasks
            base |= {
                recipe.tasks[j].name: evaluate_task(prepared, recipe.tasks[j], *prepared.evals[j])
                for j in missing
            }
            run_dir.write(root / "base.json", base)
        records = train_stages(recipe, prepared, run_dir, world, export_hf)
        data = report(recipe, base, records, root, tensorboard) if world.rank == 0 else None
    world.close()  # on success only: after a failure, a barrier could wait for a rank that is gone
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
