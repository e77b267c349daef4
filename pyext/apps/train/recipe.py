"""Recipes: the YAML schema read into dataclasses, every key checked, errors with file and line.

`load_recipe` reports the first problem as `FILE:LINE: KEY: what is wrong`; problems that need
the model or the data (a method the model cannot take, a malformed data file) are reported the
same way by the runner, through the `where` each spec keeps, before any training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slimtune

from ..shipped import SHIPPED
from .data import FIELDS, Form, Source
from .loop import DDP, FSDP2
from .models import BUILTIN, DTYPES, ModelSpec, llama_keys
from .operations import FPF, Operation, Place, ReadContext, read_operation
from .schema import (
    BOOL,
    INT,
    LIMITS,
    LIST,
    NAMES,
    NUMBER,
    TEXT,
    Section,
    SettingError,
    load_yaml,
    read_settings,
    read_values,
    setting,
)
from .stage_methods import StageMethod, known_methods, make_method, method_options
from .step_log import check_tensorboard
from .tasks import TASKS, Match


@dataclass(frozen=True)
class TaskSpec:
    """An evaluation task: a generated `task` or a data `path`; `stages` teach it (one per branch)."""

    name: str
    task: str | None
    path: Path | None
    n: int | None
    stages: tuple[str, ...]
    where: str
    form: Form = field(default_factory=Form)
    match: Match = field(default_factory=Match)
    prompt: str | None = None  # None: the model as it is; "without": no soft prompt; a prompt stage's name


WITHOUT = "without"


SCHEDULES = ("constant", "linear", "cosine")
MATCHES = ("exact", "contains", "word", "loss")


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    parent: str | None  # `from`: the stage whose model this one starts from (None: the previous one;
    # "base": the recipe's model as built, so several stages can start from the same base)
    data: tuple[Source, ...]
    steps: int | None
    epochs: float | None
    batch_size: int = setting(8, INT, positive=True, at_most=LIMITS["batch_size"])
    grad_accum: int = setting(1, INT, positive=True, at_most=LIMITS["batch_size"])
    lr: float = setting(1e-3, NUMBER, positive=True)
    schedule: str = setting("constant", TEXT, choices=SCHEDULES)
    warmup_steps: int = setting(0, INT, at_least=0, at_most=LIMITS["steps"])
    weight_decay: float = setting(0.0, NUMBER)
    method_name: str
    method_options: dict[str, Any]
    method_where: str
    pre: tuple[Operation, ...]
    post: tuple[Operation, ...]
    where: str
    kfpf: FPF | None = None  # k-FPF: FPF k times during the stage's training
    corda_data: tuple[Source, ...] = ()  # CorDA's samples (empty: the stage's own data)
    corda_rows: int = 32

    @property
    def uses_corda(self) -> bool:
        """Whether the stage's LoRA adapters are built by CorDA (from covariance samples)."""
        return self.method_options.get("init") in slimtune.corda.MODES

    def method(self) -> StageMethod:
        """A fresh method object for this stage (it holds the stage's training state)."""
        return make_method(self.method_name, self.method_options)


def _all_linear(targets: tuple[str, ...]) -> str | tuple[str, ...]:
    return targets[0] if targets == ("all-linear",) else targets


@dataclass(frozen=True)
class Intruders:
    """`intruders`: after every stage, count each targeted linear's intruder dimensions against the
    base model (`slimtune.diagnostics.intruder_dimensions`)."""

    k: int = setting(10, INT, positive=True, at_most=4096)
    threshold: float = setting(0.5, NUMBER, positive=True)
    target_modules: str | tuple[str, ...] = setting("all-linear", NAMES, convert=_all_linear)

    def __post_init__(self) -> None:
        if self.threshold > 1:
            raise SettingError("threshold", f"a cosine threshold is in (0, 1], got {self.threshold}")


@dataclass(frozen=True)
class Logging:
    """`log`: where the step figures go besides train.log and each stage's steps.csv (always)."""

    tensorboard: bool = setting(False, BOOL)  # TensorBoard event files in RUN/tensorboard (the extra)


@dataclass(frozen=True)
class Recipe:
    file: Path
    data: dict[str, Any]  # as read, to check that `--resume` continues the same recipe
    description: str
    seed: int
    seq_len: int
    device: str
    model: ModelSpec
    tasks: tuple[TaskSpec, ...]
    stages: tuple[Stage, ...]
    intruders: Intruders | None = None
    log: Logging = Logging()
    distributed: str = DDP  # how a `torchrun` launch spreads each stage's training: DDP or FSDP2

    def parent(self, index: int) -> int:
        """The stage whose model stage `index` starts from (-1: the base model)."""
        names = [s.name for s in self.stages]
        parent = self.stages[index].parent
        if parent == BASE:
            return -1
        return names.index(parent) if parent is not None else index - 1

    def lineage(self, index: int) -> list[int]:
        """The stages whose training the model after stage `index` holds, in order."""
        return [*self.lineage(self.parent(index)), index] if index >= 0 else []

    def uses_fpf(self) -> bool:
        """Whether any stage runs FPF (then every stage records its modules' drift)."""
        return any(s.kfpf is not None or any(op.needs_drift for op in s.post) for s in self.stages)

    def leaves(self) -> list[int]:
        """The stages no other stage starts from: the ends of the recipe's branches (the last one last)."""
        parents = {self.parent(j) for j in range(len(self.stages))}
        return [j for j in range(len(self.stages)) if j not in parents]


BASE = "base"  # `from: base`: start from the model as built
NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")  # one plain path component: never `.`, `..`


def _name(section: Section, key: str, seen: set[str]) -> str:
    name = section.get(key, TEXT)
    if name == BASE:
        raise section.error(key, f"{BASE!r} names the base model (`from: {BASE}`); choose another name")
    if not NAME.fullmatch(name):
        raise section.error(
            key, f"{name!r}: a name starts with a letter, digit, _ + or -, then those and . (it names files)"
        )
    if name in seen:
        raise section.error(key, f"{name!r} is used twice; names must be unique")
    seen.add(name)
    return name


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as on the Hugging Face hub


def _path(section: Section, key: str, base: Path, model: bool = False) -> Path:
    text = section.get(key, TEXT)
    path = base / text
    if not path.exists():
        if model and HUB_ID.fullmatch(text):
            raise section.error(
                key,
                f"{text!r} looks like a Hugging Face hub id: slimtune loads nothing from the network; "
                f"download the model first and give its local folder (or use `builtin: smollm2-135m`)",
            )
        raise section.error(key, f"{path} does not exist (relative paths start at the recipe's folder)")
    return path


def _one_of(section: Section, keys: tuple[str, ...]) -> str:
    present = [k for k in keys if section.has(k)]
    if len(present) != 1:
        raise section.error(None, f"give exactly one of {', '.join(keys)} (found {present or 'none'})")
    return present[0]


def _model(section: Section, base: Path) -> ModelSpec:
    kind = _one_of(section, ("builtin", "path"))
    dtype = section.get("dtype", TEXT, "float32")
    if dtype not in DTYPES:
        raise section.error("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    if kind == "path":
        spec = ModelSpec(path=_path(section, "path", base, model=True), dtype=dtype, where=section.where())
    else:
        builtin = section.get("builtin", TEXT)
        known = [*slimtune.models.names(), *BUILTIN]
        if builtin not in known:
            raise section.error(
                "builtin", f"{builtin!r} is not a built-in model; choose from {', '.join(known)}"
            )
        if builtin in slimtune.models.BUILTINS:
            if section.has("config"):
                raise section.error("config", f"{builtin} is pretrained: its config cannot be changed")
            if not slimtune.models.is_available(builtin):
                raise section.error("builtin", f"{builtin} is not installed: {slimtune.models.INSTALL}")
        config = section.section("config", {})
        for key in config.data:
            if key not in llama_keys():
                raise config.error(
                    key, f"unknown key {key!r}: the config of a built-in model takes LlamaConfig fields"
                )
        spec = ModelSpec(builtin=builtin, config=dict(config.data), dtype=dtype, where=section.where())
    section.close()
    return spec


def _method(section: Section, inherited: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """A method mapping (`name`, options); a stage's overrides the recipe's unless it names another method."""
    options = dict(section.data)
    name = options.pop("name", None)
    if inherited is not None and name in (None, inherited["name"]):
        name, options = inherited["name"], {**inherited["options"], **options}
    if name is None:
        raise section.error(None, f"missing required key 'name' (one of {', '.join(known_methods())})")
    if not isinstance(name, str) or name not in known_methods():
        raise section.error("name", f"unknown method {name!r}; choose from {', '.join(known_methods())}")
    allowed = method_options(name)
    for key in options:
        if key not in allowed:
            takes = ", ".join(allowed) or "no options"
            raise section.error(
                key if key in section.data else None, f"unknown {name} option {key!r}; {name} takes: {takes}"
            )
    missing = [k for k, required in allowed.items() if required and k not in options]
    if missing:
        raise section.error(None, f"{name} needs {', '.join(repr(k) for k in missing)}")
    try:
        make_method(name, options)
    except (TypeError, ValueError) as err:
        raise section.error(None, str(err)) from None
    return name, options


def _source(section: Section, base: Path, stages: list[str]) -> Source:
    kind = _one_of(section, ("path", "task", "stage"))
    source = Source(
        path=_path(section, "path", base) if kind == "path" else None,
        task=section.get("task", TEXT, None),
        stage=section.get("stage", TEXT, None),
        weight=section.positive("weight", NUMBER, 1.0),
        n=section.positive("n", INT, None, LIMITS["n"]),
        where=section.where(kind),
        form=_form(section),
    )
    if source.task is not None and source.task not in TASKS:
        raise section.error("task", f"unknown generated task {source.task!r}; choose from {', '.join(TASKS)}")
    if source.stage is not None and source.stage not in stages:
        raise section.error(
            "stage", f"{source.stage!r} is not an earlier stage (earlier: {stages or 'none'})"
        )
    section.close()
    return source


def _form(section: Section) -> Form:
    """`fields` (slimtune's field name: the file's) and `chat` (wrap prompt/completion in the template)."""
    fields = section.section("fields", {})
    for key, value in fields.data.items():
        if key not in FIELDS:
            raise fields.error(key, f"unknown field {key!r}; map any of {', '.join(FIELDS)} to a field name")
        if not isinstance(value, str) or not value:
            raise fields.error(key, f"expected the file's field name for {key!r}, got {value!r}")
    return Form(tuple(sorted(fields.data.items())), section.get("chat", BOOL, False))


def _match(section: Section) -> Match:
    """`match` (exact, contains, word, loss), `answer_pattern` (a regex; its first group is the
    answer) and `max_new_tokens` (the reply's budget)."""
    kind = section.get("match", TEXT, "exact")
    if kind not in MATCHES:
        raise section.error("match", f"{kind!r} is not one of {', '.join(MATCHES)}")
    budget = section.positive("max_new_tokens", INT, None, 4096)
    pattern = section.get("answer_pattern", TEXT, None)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise section.error("answer_pattern", f"not a valid regular expression: {err}") from None
    return Match(kind, pattern, budget)


def _operations(section: Section, key: str, context: ReadContext) -> tuple[Operation, ...]:
    """A stage's `pre` or `post` list, each entry read by its registered operation."""
    operations = []
    for i, item in enumerate(section.get(key, LIST, [])):
        line = getattr(item, "line", section.data.lines.get(key, section.line))
        place = Place(section.file, line, f"{section.path}.{key}[{i}]")
        operations.append(read_operation(item, place, key, context))
    return tuple(operations)


def _kfpf(section: Section, method_name: str) -> FPF | None:
    """k-FPF's settings: the `fpf` operation's keys and the required `k`; methods full and hft."""
    if not section.has("kfpf"):
        return None
    settings = section.section("kfpf")
    if not settings.has("k"):
        raise settings.error(None, "missing required key 'k' (how many times FPF runs during the stage)")
    if method_name not in ("full", "hft"):
        raise section.error(
            "kfpf", f"k-FPF trains the model's own modules during the stage: it needs method full or hft, "
            f"not {method_name} (an fpf post operation works after a stage of any method)"
        )  # fmt: skip
    return read_settings(settings, FPF)


def _corda(
    section: Section, options: dict[str, Any], base: Path, earlier: list[str]
) -> tuple[tuple[Source, ...], int]:
    """CorDA's samples (`corda: {data, rows}`) for a lora stage with a CorDA init; none: the stage's data."""
    if not section.has("corda"):
        return (), 32
    corda = section.section("corda")
    if options.get("init") not in slimtune.corda.MODES:
        raise section.error(
            "corda", "corda sets CorDA's samples; it needs method lora with init corda-kpm or corda-ipm"
        )
    data = tuple(_source(s, base, earlier) for s in corda.sections("data", []))
    rows = corda.positive("rows", INT, 32, LIMITS["n"])
    corda.close()
    return data, rows


def _stage(
    section: Section, base: Path, method: dict[str, Any], names: set[str], diff_stages: list[str]
) -> Stage:
    earlier = sorted(names)
    name = _name(section, "name", names)
    parent = section.get("from", TEXT, None)
    if parent is not None and parent != BASE and parent not in earlier:
        raise section.error(
            "from", f"{parent!r} is not an earlier stage (earlier: {earlier or 'none'}) or {BASE!r}"
        )
    sources = tuple(_source(s, base, earlier) for s in section.sections("data"))
    if not sources:
        raise section.error("data", "a stage needs at least one data source")
    length = _one_of(section, ("steps", "epochs"))
    method_section = section.section("method", {})
    method_name, options = _method(method_section, method)
    training = read_values(section, Stage)  # batch_size, grad_accum, lr, schedule, warmup, decay
    if method_name == "sparse-diff" and training["weight_decay"]:
        raise section.error(
            "weight_decay", "sparse-diff needs weight_decay 0 (decay would move unmasked entries)"
        )
    kfpf = _kfpf(section, method_name)
    corda_data, corda_rows = _corda(section, options, base, earlier)
    pre = _operations(section, "pre", ReadContext(base, tuple(diff_stages)))
    if make_method(method_name, options).writes_diff:
        diff_stages.append(name)
    post = _operations(section, "post", ReadContext(base, tuple(diff_stages)))
    stage = Stage(
        name=name,
        parent=parent,
        data=sources,
        steps=section.positive("steps", INT, None, LIMITS["steps"]) if length == "steps" else None,
        epochs=section.positive("epochs", NUMBER, None, LIMITS["epochs"]) if length == "epochs" else None,
        **training,
        method_name=method_name,
        method_options=options,
        method_where=method_section.where() if section.has("method") else method["where"],
        pre=pre,
        post=post,
        where=section.where(),
        kfpf=kfpf,
        corda_data=corda_data,
        corda_rows=corda_rows,
    )
    if stage.batch_size % stage.grad_accum:
        raise section.error(
            "batch_size", f"{stage.batch_size} is not a multiple of grad_accum={stage.grad_accum}"
        )
    section.close()
    return stage


def _task(section: Section, base: Path, names: set[str], stages: list[str], prompts: list[str]) -> TaskSpec:
    name = _name(section, "name", names)
    prompt = section.get("prompt", TEXT, None)
    if prompt is not None and prompt != WITHOUT and prompt not in prompts:
        raise section.error(
            "prompt", f"{prompt!r} is neither {WITHOUT!r} nor a stage of method prompt ({prompts or 'none'})"
        )
    kind = _one_of(section, ("task", "path"))
    task = TaskSpec(
        name=name,
        task=section.get("task", TEXT, None),
        path=_path(section, "path", base) if kind == "path" else None,
        n=section.positive("n", INT, 64 if kind == "task" else None, LIMITS["n"]),
        stages=section.get("stage", NAMES, ()),
        where=section.where(kind),
        form=_form(section),
        match=_match(section),
        prompt=prompt,
    )
    if task.task is not None and task.task not in TASKS:
        raise section.error("task", f"unknown generated task {task.task!r}; choose from {', '.join(TASKS)}")
    for stage in task.stages:
        if stage not in stages:
            raise section.error("stage", f"{stage!r} is not a stage of this recipe ({', '.join(stages)})")
    section.close()
    return task


def parse(data: Any, file: Path) -> Recipe:
    """Check a loaded recipe mapping and build the Recipe (the first problem raises RecipeError)."""
    top = Section(data, "", file, 1)
    base = file.parent
    description = top.get("description", TEXT, "")
    seed = top.get("seed", INT, 0)
    seq_len = top.positive("seq_len", INT, 64, LIMITS["seq_len"])
    device = top.get("device", TEXT, "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise top.error("device", f"{device!r} is not one of auto, cpu, cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise top.error("device", "cuda was asked for but torch sees no CUDA device; use auto or cpu")
    model = _model(top.section("model"), base)
    method_section = top.section("method", {"name": "full"})
    name, options = _method(method_section, None)
    method = {"name": name, "options": options, "where": method_section.where()}
    stage_names: set[str] = set()
    diff_stages: list[str] = []
    stages = tuple(_stage(s, base, method, stage_names, diff_stages) for s in top.sections("stages"))
    if not stages:
        raise top.error("stages", "a recipe needs at least one stage")
    task_names: set[str] = set()
    prompts = [s.name for s in stages if s.method_name == "prompt"]
    tasks = tuple(
        _task(s, base, task_names, [s.name for s in stages], prompts) for s in top.sections("tasks")
    )
    if not tasks:
        raise top.error("tasks", "a recipe needs at least one evaluation task")
    intruders = read_settings(top.section("intruders"), Intruders) if top.has("intruders") else None
    logging = _logging(top.section("log")) if top.has("log") else Logging()
    distributed = _distributed(top, stages)
    top.close()
    return Recipe(
        file, dict(data), description, seed, seq_len, device, model, tasks, stages, intruders, logging,
        distributed,
    )  # fmt: skip


# What FSDP2 cannot shard in the trainer: training state that lives outside the sharded copy.
NOT_SHARDED = {
    "sparse-diff": "its gradient masks hook the unsharded parameters",
    "prompt": "its soft prompt is not a model parameter, so no engine would reduce its gradients",
}


def _distributed(top: Section, stages: tuple[Stage, ...]) -> str:
    """`distributed`: ddp (default) or fsdp2, refused where a stage's training cannot be sharded."""
    strategy = top.get("distributed", TEXT, DDP)
    if strategy not in (DDP, FSDP2):
        raise top.error("distributed", f"{strategy!r} is not one of {DDP}, {FSDP2}")
    for stage in stages if strategy == FSDP2 else ():
        if stage.method_name in NOT_SHARDED:
            raise top.error(
                "distributed",
                f"fsdp2 does not train stage {stage.name!r} ({stage.method_name}: "
                f"{NOT_SHARDED[stage.method_name]}); use distributed: {DDP}",
            )
        if stage.kfpf is not None:
            raise top.error(
                "distributed", f"fsdp2 does not run stage {stage.name!r}'s k-FPF steps (they train the "
                f"unsharded model mid-stage); use distributed: {DDP}",
            )  # fmt: skip
    return strategy


def _logging(section: Section) -> Logging:
    logging = read_settings(section, Logging)
    if logging.tensorboard:
        check_tensorboard(section.where("tensorboard"))
    return logging


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file; a bare name such as `sequential` is a shipped recipe."""
    file = Path(path)
    if not file.exists() and file.suffix == "" and (SHIPPED / f"{file.name}.yaml").is_file():
        file = SHIPPED / f"{file.name}.yaml"
    return parse(load_yaml(file), file)
