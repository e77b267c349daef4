"""Recipe operations: what a stage runs before its training (`pre`) or after it (`post`).

Each operation is a frozen dataclass of its settings, registered under its recipe key and shaped
like a stage method: `read` builds it from the recipe (the generic settings reader, from the
fields declared with `setting`), `check` refuses, before any training, what only the model or the
other stages reveal, and `run` carries it out on the stage's model and returns its record for the
stage's result (or None). The work itself is a `slimtune.toolbox` function. Adding an operation
is that function plus one registered class here (`docs/trainer.md`, "Adding an operation", has an
example); the parser, the up-front checks and the stage loop need no edit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import slimtune
from slimtune.toolbox.fpf import AUTO
from slimtune.toolbox.graft import PROCEDURES
from torch import nn

from . import graft
from .schema import (
    BOOL,
    INT,
    LIMITS,
    NAMES,
    NUMBER,
    TEXT,
    Mapping,
    RecipeError,
    Section,
    SettingError,
    read_settings,
    setting,
)

if TYPE_CHECKING:
    from .recipe import Recipe, Stage
    from .stages import StageRun


@dataclass(frozen=True)
class Place:
    """Where an operation stands in the recipe: its file, line and path (`stages[1].post[0]`)."""

    file: Path
    line: int
    path: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.path}"

    def section(self, name: str, value: Any) -> Section:
        """The operation's settings mapping (none given: all defaults)."""
        return Section(Mapping() if value is None else value, f"{self.path}.{name}", self.file, self.line)


@dataclass(frozen=True)
class ReadContext:
    """What reading an operation may need besides its own value."""

    base: Path  # the recipe's folder (relative files start there)
    diff_stages: tuple[str, ...]  # the stages so far that leave a sparse diff (a post's own included)


class Operation:
    """The base of every recipe operation (see the module docstring)."""

    name: ClassVar[str] = ""  # the recipe key
    post_only: ClassVar[str] = ""  # why it cannot run before training ("": pre and post)
    needs_start: ClassVar[bool] = False  # `run` uses the model as the stage started (`here.start`)
    needs_drift: ClassVar[bool] = False  # `run` uses the modules' drift (every stage then records it)
    where: str

    @classmethod
    def read(cls, value: Any, place: Place, context: ReadContext) -> Operation:
        """The operation from its recipe value: a settings mapping, or nothing for the defaults."""
        return read_settings(place.section(cls.name, value), cls)

    def check(self, model: nn.Module, stage: Stage, recipe: Recipe) -> None:
        """Raise ValueError (or OSError) for what would fail only in the run, before any training."""

    def run(self, here: StageRun, number: int) -> dict[str, Any] | None:
        """Carry it out (`number`: its place in the stage's list); its record, or None."""
        raise NotImplementedError


OPERATIONS: dict[str, type[Operation]] = {}


def register(cls: type[Operation]) -> type[Operation]:
    """Make `cls` an operation recipes can name (its `name`, once)."""
    if not cls.name or cls.name in OPERATIONS:
        raise ValueError(f"operation name {cls.name!r} is empty or taken")
    OPERATIONS[cls.name] = cls
    return cls


@register
@dataclass(frozen=True)
class Lines(Operation):
    """LiNeS: the stage's change scaled down most in the shallow blocks (`slimtune.toolbox.lines`)."""

    name = "lines"
    post_only = "lines scales the stage's change; it belongs in post"
    needs_start = True
    alpha: float = setting(0.5, NUMBER)
    beta: float | None = setting(None, NUMBER)  # None: 1 - alpha
    where: str = ""

    def __post_init__(self) -> None:
        if self.beta is None:
            object.__setattr__(self, "beta", 1.0 - self.alpha)

    def run(self, here: StageRun, number: int) -> None:
        slimtune.toolbox.lines.scale(here.prepared.model, here.start, self.alpha, self.beta)


@dataclass(frozen=True)
class _Diff(Operation):
    """Add or revert a sparse diff (`slimtune.SparseDelta`): an earlier stage's, or a file's."""

    target: str = ""  # a stage that leaves a diff, or a diff file's path
    where: str = ""
    scale: ClassVar[float] = 1.0

    @classmethod
    def read(cls, value: Any, place: Place, context: ReadContext) -> Operation:
        where = f"{place.where}.{cls.name}"
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a stage name or a diff file, got {value!r}")
        if value not in context.diff_stages and not (context.base / value).is_file():
            raise RecipeError(
                f"{where}: {value!r} is neither a stage that leaves a sparse diff "
                f"(paca, s2ft or sparse-diff; so far: {list(context.diff_stages) or 'none'}) nor a file"
            )
        return cls(value if value in context.diff_stages else str(context.base / value), where)

    def check(self, model: nn.Module, stage: Stage, recipe: Recipe) -> None:
        if self.target not in [s.name for s in recipe.stages]:
            slimtune.load_delta(self.target)  # a file: readable and a diff

    def run(self, here: StageRun, number: int) -> None:
        slimtune.load_delta(here.run.diff_file(self.target)).apply(here.prepared.model, self.scale)


@register
@dataclass(frozen=True)
class AddDiff(_Diff):
    name = "add_diff"


@register
@dataclass(frozen=True)
class RevertDiff(_Diff):
    name = "revert_diff"
    scale = -1.0


def _auto(modules: tuple[str, ...]) -> str | tuple[str, ...]:
    return AUTO if modules == (AUTO,) else modules


@register
@dataclass(frozen=True)
class FPF(Operation):
    """FPF after a stage (`fpf`), or a stage's k-FPF schedule (`kfpf`, the same keys and `k`):
    only the chosen modules train on a replay buffer of the branch's data (see `fpf.py`)."""

    name = "fpf"
    post_only = "fpf fine-tunes after a stage's training; it belongs in post"
    needs_drift = True
    buffer: int = setting(32, INT, positive=True, at_most=LIMITS["n"])
    modules: str | tuple[str, ...] = setting(AUTO, NAMES, convert=_auto)
    top: int = setting(4, INT, positive=True, at_most=10**6)
    steps: int = setting(20, INT, positive=True, at_most=LIMITS["steps"])
    lr: float = setting(1e-4, NUMBER, positive=True)
    batch_size: int = setting(8, INT, positive=True, at_most=LIMITS["batch_size"])
    k: int = setting(0, INT, positive=True, at_most=10**4)  # k-FPF only: how many times in the stage
    where: str = ""

    @classmethod
    def read(cls, value: Any, place: Place, context: ReadContext) -> Operation:
        return read_settings(place.section(cls.name, value), cls, skip=("k",))  # `k` is kfpf's

    def __post_init__(self) -> None:
        if self.modules != AUTO and AUTO in self.modules:
            raise SettingError("modules", f"give {AUTO!r} or a list of module names, not both")

    def check(self, model: nn.Module, stage: Stage, recipe: Recipe) -> None:
        if self.modules != AUTO:  # listed modules must exist (auto is decided in the run)
            slimtune.toolbox.fpf.choose(model, self.modules, self.top, [])

    def run(self, here: StageRun, number: int) -> dict[str, Any]:
        return here.fpf(self, here.drift, 1000 + number)


def _all_linear(targets: tuple[str, ...]) -> str | tuple[str, ...]:
    return targets[0] if targets == ("all-linear",) else targets


@register
@dataclass(frozen=True)
class Graft(Operation):
    """Localise what the stage taught (a share `sparsity` of the targeted entries, the mask
    optimised `steps` times at `lr` on batches of the stage's data) and report how much of it the
    graft recovers; `apply` continues from the graft, not the fine-tune (see `graft.py`)."""

    name = "graft"
    post_only = "graft localises what a stage taught; it belongs in post"
    needs_start = True
    sparsity: float = setting(1e-4, NUMBER, positive=True)
    steps: int = setting(50, INT, positive=True, at_most=LIMITS["steps"])
    lr: float | None = setting(None, NUMBER, positive=True)  # None: the procedure's default
    batch_size: int = setting(8, INT, positive=True, at_most=LIMITS["batch_size"])
    procedure: str = setting("budget", TEXT, choices=PROCEDURES)
    accumulate: int = setting(1, INT, positive=True, at_most=LIMITS["batch_size"])
    target_modules: str | tuple[str, ...] = setting("all-linear", NAMES, convert=_all_linear)
    apply: bool = setting(False, BOOL)
    where: str = ""

    def __post_init__(self) -> None:
        if self.sparsity > 1:
            raise SettingError("sparsity", f"the share of entries kept is at most 1, got {self.sparsity}")

    def check(self, model: nn.Module, stage: Stage, recipe: Recipe) -> None:
        if not any(stage.name in t.stages for t in recipe.tasks):
            raise ValueError(
                f"graft scores the skill on the tasks the stage teaches; give a task `stage: {stage.name}`"
            )

    def run(self, here: StageRun, number: int) -> dict[str, Any]:
        return graft.localise(self, here)


def read_operation(item: Any, place: Place, key: str, context: ReadContext) -> Operation:
    """One entry of a stage's `pre` or `post` list: `NAME` or `{NAME: settings}`."""
    if isinstance(item, str) and item in OPERATIONS:
        item = {item: None}
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(
            f"{place.where}: expected one operation, `NAME` or `{{NAME: settings}}` with NAME one of "
            f"{', '.join(OPERATIONS)}, got {item!r}"
        )
    ((name, value),) = item.items()
    if name not in OPERATIONS:
        close = difflib.get_close_matches(str(name), list(OPERATIONS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"{place.where}: unknown operation {name!r}; {hint}use {', '.join(OPERATIONS)}")
    if key == "pre" and OPERATIONS[name].post_only:
        raise RecipeError(f"{place.where}: {OPERATIONS[name].post_only}")
    return OPERATIONS[name].read(value, place, context)
