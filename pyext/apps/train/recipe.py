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
from .fpf import AUTO, FPF
from .graft import PROCEDURES, Graft
from .models import BUILTIN, DTYPES, ModelSpec, llama_keys
from .post import Operation
from .schema import BOOL, INT, LIST, NAMES, NUMBER, TEXT, Mapping, RecipeError, Section, load_yaml
from .stage_methods import StageMethod, known_methods, make_method, method_options
from .step_log import check_tensorboard
from .tasks import TASKS, Match

# Upper bounds checked when the recipe is read: a larger value is a typo (or would allocate or run
# for days before failing), never a run anyone meant.
LIMITS = {
    "steps": 10**8,
    "epochs": 10**6,
    "batch_size": 2**16,
    "n": 10**7,  # generated or read examples per source or task
    "seq_len": 2**20,
}


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


@dataclass(frozen=True)
class Stage:
    name: str
    parent: str | None  # `from`: the stage whose model this one starts from (None: the previous one;
    # "base": the recipe's model as built, so several stages can start from the same base)
    data: tuple[Source, ...]
    steps: int | None
    epochs: float | None
    batch_size: int
    grad_accum: int
    lr: float
    schedule: str
    warmup_steps: int
    weight_decay: float
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


@dataclass(frozen=True)
class Intruders:
    """`intruders`: after every stage, count each targeted linear's intruder dimensions against the
    base model (`slimtune.diagnostics.intruder_dimensions`)."""

    k: int = 10
    threshold: float = 0.5
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class Logging:
    """`log`: where the step figures go besides train.log and each stage's steps.csv (always)."""

    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard (the tensorboard extra)


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
        return any(s.kfpf is not None or any(op.kind == "fpf" for op in s.post) for s in self.stages)

    def leaves(self) -> list[int]:
        """The stages no other stage starts from: the ends of the recipe's branches (the last one last)."""
        parents = {self.parent(j) for j in range(len(self.stages))}
        return [j for j in range(len(self.stages)) if j not in parents]


SCHEDULES = ("constant", "linear", "cosine")
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
    """`match` (exact, contains, loss), `answer_pattern` (a regex; its first group is the answer) and
    `max_new_tokens` (the reply's budget)."""
    kind = section.get("match", TEXT, "exact")
    if kind not in ("exact", "contains", "loss"):
        raise section.error("match", f"{kind!r} is not one of exact, contains, loss")
    budget = section.positive("max_new_tokens", INT, None, 4096)
    pattern = section.get("answer_pattern", TEXT, None)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise section.error("answer_pattern", f"not a valid regular expression: {err}") from None
    return Match(kind, pattern, budget)


def _ops(section: Section, key: str, base: Path, diff_stages: list[str]) -> tuple[Operation, ...]:
    ops = []
    for i, item in enumerate(section.get(key, LIST, [])):
        line = getattr(item, "line", section.data.lines.get(key, section.line))
        where = f"{section.file}:{line}: {section.path}.{key}[{i}]"
        if item == "lines":
            item = {"lines": {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(
                f"{where}: expected 'lines', {{lines: {{alpha, beta}}}}, {{add_diff: X}} or "
                f"{{revert_diff: X}}, got {item!r}"
            )
        ((kind, value),) = item.items()
        if kind == "lines":
            if key == "pre":
                raise RecipeError(f"{where}: lines scales the stage's change; it belongs in post")
            args = Section(value or Mapping(), f"{section.path}.{key}[{i}].lines", section.file, line)
            alpha = args.get("alpha", NUMBER, 0.5)
            ops.append(Operation("lines", alpha, args.get("beta", NUMBER, 1.0 - alpha), where=where))
            args.close()
        elif kind in ("add_diff", "revert_diff"):
            if not isinstance(value, str):
                raise RecipeError(f"{where}.{kind}: expected a stage name or a diff file, got {value!r}")
            if value not in diff_stages and not (base / value).is_file():
                raise RecipeError(
                    f"{where}.{kind}: {value!r} is neither a stage that leaves a sparse diff "
                    f"(paca, s2ft or sparse-diff; so far: {diff_stages or 'none'}) nor a file"
                )
            target = value if value in diff_stages else str(base / value)
            ops.append(Operation(kind, target=target, where=f"{where}.{kind}"))
        elif kind == "fpf":
            if key == "pre":
                raise RecipeError(f"{where}: fpf fine-tunes after a stage's training; it belongs in post")
            args = Section(value or Mapping(), f"{section.path}.{key}[{i}].fpf", section.file, line)
            ops.append(Operation("fpf", where=f"{where}.fpf", fpf=_fpf(args, k=False)))
        elif kind == "graft":
            if key == "pre":
                raise RecipeError(f"{where}: graft localises what a stage taught; it belongs in post")
            args = Section(value or Mapping(), f"{section.path}.{key}[{i}].graft", section.file, line)
            ops.append(Operation("graft", where=f"{where}.graft", graft=_graft(args)))
        else:
            raise RecipeError(
                f"{where}: unknown operation {kind!r}; use lines, add_diff, revert_diff, fpf or graft"
            )
    return tuple(ops)


def _fpf(section: Section, k: bool) -> FPF:
    """FPF settings (`kfpf` also takes `k`, how many times during the stage)."""
    modules = section.get("modules", NAMES, (AUTO,))
    fpf = FPF(
        buffer=section.positive("buffer", INT, 32, LIMITS["n"]),
        modules=AUTO if modules == (AUTO,) else modules,
        top=section.positive("top", INT, 4, 10**6),
        steps=section.positive("steps", INT, 20, LIMITS["steps"]),
        lr=section.positive("lr", NUMBER, 1e-4),
        batch_size=section.positive("batch_size", INT, 8, LIMITS["batch_size"]),
        k=section.positive("k", INT, None, 10**4) if k else 0,
        where=section.where(),
    )
    if k and fpf.k is None:
        raise section.error(None, "missing required key 'k' (how many times FPF runs during the stage)")
    if AUTO in modules and len(modules) > 1:
        raise section.error("modules", f"give {AUTO!r} or a list of module names, not both")
    section.close()
    return fpf


def _graft(section: Section) -> Graft:
    """Grafting settings: the share of targeted entries kept, the mask's optimisation, the data."""
    sparsity = section.positive("sparsity", NUMBER, 1e-4)
    if sparsity > 1:
        raise section.error("sparsity", f"the share of entries kept is at most 1, got {sparsity}")
    procedure = section.get("procedure", TEXT, "budget")
    if procedure not in PROCEDURES:
        raise section.error("procedure", f"{procedure!r} is not one of {', '.join(PROCEDURES)}")
    graft = Graft(
        sparsity=sparsity,
        steps=section.positive("steps", INT, 50, LIMITS["steps"]),
        lr=section.positive("lr", NUMBER, None),
        batch_size=section.positive("batch_size", INT, 8, LIMITS["batch_size"]),
        procedure=procedure,
        accumulate=section.positive("accumulate", INT, 1, LIMITS["batch_size"]),
        target_modules=_all_linear(section.get("target_modules", NAMES, ("all-linear",))),
        apply=section.get("apply", BOOL, False),
        where=section.where(),
    )
    section.close()
    return graft


def _all_linear(targets: tuple[str, ...]) -> str | tuple[str, ...]:
    return targets[0] if targets == ("all-linear",) else targets


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
    weight_decay = section.get("weight_decay", NUMBER, 0.0)
    if method_name == "sparse-diff" and weight_decay:
        raise section.error(
            "weight_decay", "sparse-diff needs weight_decay 0 (decay would move unmasked entries)"
        )
    schedule = section.get("schedule", TEXT, "constant")
    if not 0 <= section.get("warmup_steps", INT, 0) <= LIMITS["steps"]:
        raise section.error("warmup_steps", f"must be in [0, {LIMITS['steps']:g}]")
    if schedule not in SCHEDULES:
        raise section.error("schedule", f"{schedule!r} is not one of {', '.join(SCHEDULES)}")
    writes_diff = make_method(method_name, options).writes_diff
    kfpf = _fpf(section.section("kfpf"), k=True) if section.has("kfpf") else None
    corda_data, corda_rows = (), 32
    if section.has("corda"):
        corda = section.section("corda")
        if options.get("init") not in slimtune.corda.MODES:
            raise section.error(
                "corda", "corda sets CorDA's samples; it needs method lora with init corda-kpm or corda-ipm"
            )
        corda_data = tuple(_source(s, base, earlier) for s in corda.sections("data", []))
        corda_rows = corda.positive("rows", INT, 32, LIMITS["n"])
        corda.close()
    if kfpf is not None and method_name not in ("full", "hft"):
        raise section.error(
            "kfpf", f"k-FPF trains the model's own modules during the stage: it needs method full or hft, "
            f"not {method_name} (an fpf post operation works after a stage of any method)"
        )  # fmt: skip
    pre = _ops(section, "pre", base, list(diff_stages))
    post = _ops(section, "post", base, [*diff_stages, name] if writes_diff else list(diff_stages))
    if writes_diff:
        diff_stages.append(name)
    stage = Stage(
        name=name,
        parent=parent,
        data=sources,
        steps=section.positive("steps", INT, None, LIMITS["steps"]) if length == "steps" else None,
        epochs=section.positive("epochs", NUMBER, None, LIMITS["epochs"]) if length == "epochs" else None,
        batch_size=section.positive("batch_size", INT, 8, LIMITS["batch_size"]),
        grad_accum=section.positive("grad_accum", INT, 1, LIMITS["batch_size"]),
        lr=section.positive("lr", NUMBER, 1e-3),
        schedule=schedule,
        warmup_steps=section.get("warmup_steps", INT, 0),
        weight_decay=weight_decay,
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
    intruders = _intruders(top.section("intruders")) if top.has("intruders") else None
    logging = _logging(top.section("log")) if top.has("log") else Logging()
    top.close()
    return Recipe(
        file, dict(data), description, seed, seq_len, device, model, tasks, stages, intruders, logging
    )


def _logging(section: Section) -> Logging:
    tensorboard = section.get("tensorboard", BOOL, False)
    section.close()
    if tensorboard:
        check_tensorboard(section.where("tensorboard"))
    return Logging(tensorboard)


def _intruders(section: Section) -> Intruders:
    k = section.positive("k", INT, 10, 4096)
    threshold = section.positive("threshold", NUMBER, 0.5)
    if threshold > 1:
        raise section.error("threshold", f"a cosine threshold is in (0, 1], got {threshold}")
    targets = section.get("target_modules", NAMES, ("all-linear",))
    section.close()
    return Intruders(k, threshold, _all_linear(targets))


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file; a bare name such as `sequential` is a shipped recipe."""
    file = Path(path)
    if not file.exists() and file.suffix == "" and (SHIPPED / f"{file.name}.yaml").is_file():
        file = SHIPPED / f"{file.name}.yaml"
    return parse(load_yaml(file), file)
