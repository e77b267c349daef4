"""The run's folder: the recipe and data it belongs to (what `--resume` checks), each stage's
folder, and the log."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import slimtune
from tqdm import tqdm

from . import loop, step_log
from .recipe import Recipe
from .schema import RecipeError
from .stage_methods import DIFF_FILE

log = logging.getLogger("slimtune.train")


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
        # Neither where figures go nor how processes share the work (same steps either way) is the run.
        trained = {k: v for k, v in recipe.data.items() if k not in ("log", "distributed")}
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

    def diff_file(self, target: str) -> Path:
        """The diff an `add_diff` / `revert_diff` names: a stage's (in this run folder), or a file."""
        names = [s.name for s in self.recipe.stages]
        return self.stage(names.index(target)) / DIFF_FILE if target in names else Path(target)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


@contextlib.contextmanager
def logging_to(root: Path, rank: int) -> Iterator[None]:
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
                slimtune.files.hash_file(file, hasher)
        # Keyed by the path from the recipe's folder: the same whatever the working directory.
        digests[os.path.relpath(path.resolve(), recipe.file.resolve().parent)] = hasher.hexdigest()
    return digests
