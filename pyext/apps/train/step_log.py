"""Where each optimizer step's figures go: the stage's `steps.csv` always, TensorBoard on request.

A stage that trains again (a resumed run redoes the stage it was cut in) starts its files anew, so
they hold exactly the steps of the stage's finished training; finished stages keep theirs.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from .schema import RecipeError

STEPS_FILE = "steps.csv"
TENSORBOARD = "tensorboard"  # the run folder's TensorBoard logdir: one run per stage, and `evaluation`
INSTALL_TB = "pip install 'slimtune[tensorboard]' or pip install tensorboard"


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step of a stage (`step` counts from 1 over all of the stage's training)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    ms: float


class StepSink(Protocol):
    def write(self, record: StepRecord) -> None: ...

    def close(self) -> None: ...


class CSVSink:
    """`steps.csv`: a header, then a row per step, flushed as written (a cut run keeps its steps)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow([f.name for f in fields(StepRecord)])
        self.file.flush()

    def write(self, record: StepRecord) -> None:
        self.writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in asdict(record).values()])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def tensorboard_writer(folder: Path) -> Any:
    """A fresh `SummaryWriter` in `folder` (what an earlier attempt wrote there is removed)."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    return SummaryWriter(str(folder), flush_secs=10)


class TensorBoardSink:
    """`train/<figure>` scalars of the stage's TensorBoard run, by step."""

    def __init__(self, folder: Path) -> None:
        self.writer = tensorboard_writer(folder)

    def write(self, record: StepRecord) -> None:
        for name, value in asdict(record).items():
            if name != "step":
                self.writer.add_scalar(f"train/{name}", value, record.step)

    def close(self) -> None:
        self.writer.close()


def check_tensorboard(where: str) -> None:
    """Refuse TensorBoard logging before the run starts when the package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise RecipeError(f"{where}: TensorBoard logging needs the tensorboard package: {INSTALL_TB}")


def sinks(stage_folder: Path, tensorboard_folder: Path | None) -> list[StepSink]:
    """A stage's sinks: its CSV, and its TensorBoard run where asked for."""
    chosen: list[StepSink] = [CSVSink(stage_folder / STEPS_FILE)]
    if tensorboard_folder is not None:
        chosen.append(TensorBoardSink(tensorboard_folder))
    return chosen


def write_evaluations(
    folder: Path, labels: list[str], tasks: list[str], acc: list[list[Any]], loss: list[list[Any]]
) -> None:
    """Every task's accuracy and loss after each stage (step 0: the base model, then the stages in
    recipe order, `labels`) as one TensorBoard run, written anew from the run's results."""
    writer = tensorboard_writer(folder)
    for position, label in enumerate(labels):
        writer.add_text("eval/stage", label, position)
        for j, task in enumerate(tasks):
            for name, value in (("accuracy", acc[position][j]), ("loss", loss[position][j])):
                if value is not None:
                    writer.add_scalar(f"eval/{task}/{name}", value, position)
    writer.close()
