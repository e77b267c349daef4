"""Reading a YAML recipe key by key, so that every refusal names the file, the line and the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml


class RecipeError(Exception):
    """A bad recipe (or its data): the message names the key and its line."""


class Mapping(dict):
    """A YAML mapping that remembers its own line and the line of each key."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.line, self.lines = 0, {}


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Mapping:
    loader.flatten_mapping(node)
    mapping = Mapping()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# Value kinds: a converter that raises TypeError, and its name for messages.
def INT(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def NUMBER(value: Any) -> float:
    """A number, also as YAML 1.1 leaves some as strings (1e-3), or a fraction 'a/b' (DMT's 1/256)."""
    if isinstance(value, str):
        if re.fullmatch(r"\s*\d+\s*/\s*[1-9]\d*\s*", value):
            top, bottom = value.split("/")
            return int(top) / int(bottom)
        try:
            value = float(value)
        except ValueError:
            raise TypeError from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError
    return float(value)


def _kind(check: type) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if not isinstance(value, check):
            raise TypeError
        return value

    return convert


def NAMES(value: Any) -> tuple[str, ...]:
    """One name or a list of names."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError
    return tuple(names)


TEXT, MAPPING, LIST, BOOL = _kind(str), _kind(dict), _kind(list), _kind(bool)
KINDS: dict[Callable[[Any], Any], str] = {
    BOOL: "true or false",
    INT: "an integer",
    NUMBER: "a finite number",
    TEXT: "a string",
    NAMES: "a name or a list of names",
    MAPPING: "a mapping (key: value lines)",
    LIST: "a list (lines starting with '- ')",
}
_REQUIRED = object()

# Upper bounds checked when the recipe is read: a larger value is a typo (or would allocate or run
# for days before failing), never a run anyone meant.
LIMITS = {
    "steps": 10**8,
    "epochs": 10**6,
    "batch_size": 2**16,
    "n": 10**7,  # generated or read examples per source or task
    "seq_len": 2**20,
}


class Section:
    """One mapping of the recipe, read key by key; `close` refuses the keys nobody read."""

    def __init__(self, data: Any, path: str, file: Path, line: int) -> None:
        self.file, self.path = file, path
        self.line = line
        if not isinstance(data, dict):
            raise RecipeError(
                f"{self.file}:{self.line}: {path}: expected a mapping (key: value lines), got {data!r}"
            )
        self.data, self.read = data, set()

    def where(self, key: str | None = None) -> str:
        line = self.data.lines.get(key, self.line) if key is not None else self.line
        name = f"{self.path}.{key}" if self.path and key is not None else (key or self.path or "recipe")
        return f"{self.file}:{line}: {name}"

    def error(self, key: str | None, message: str) -> RecipeError:
        return RecipeError(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        self.read.add(key)  # a key asked about is a known key, listed when refusing an unknown one
        return key in self.data

    def get(self, key: str, kind: Callable[[Any], Any], default: Any = _REQUIRED) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(None, f"missing required key {key!r}")
            return default
        try:
            return kind(self.data[key])
        except TypeError:
            raise self.error(key, f"expected {KINDS[kind]}, got {self.data[key]!r}") from None

    def positive(
        self, key: str, kind: Callable[[Any], Any], default: Any = _REQUIRED, at_most: float | None = None
    ) -> Any:
        """A value > 0 and, where `at_most` is given, no larger (refused up front, not after an hour
        of allocation or a hang)."""
        value = self.get(key, kind, default)
        if value is not None and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        if value is not None and at_most is not None and value > at_most:
            raise self.error(key, f"{value} is beyond the largest value that makes sense here ({at_most:g})")
        return value

    def section(self, key: str, default: Any = _REQUIRED) -> Section:
        data = self.get(key, MAPPING, Mapping(default) if default is not _REQUIRED else default)
        return Section(
            data, f"{self.path}.{key}" if self.path else key, self.file, self.data.lines.get(key, self.line)
        )

    def sections(self, key: str, default: Any = _REQUIRED) -> list[Section]:
        items = self.get(key, LIST, default)
        line = self.data.lines.get(key, self.line)
        prefix = f"{self.path}.{key}" if self.path else key
        return [
            Section(item, f"{prefix}[{i}]", self.file, getattr(item, "line", line))
            for i, item in enumerate(items)
        ]

    def close(self) -> None:
        unknown = [k for k in self.data if k not in self.read]
        if unknown:
            key, known = unknown[0], sorted(self.read)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise self.error(key, f"unknown key {key!r}; {hint}known keys here: {', '.join(known)}")


@dataclass(frozen=True)
class Setting:
    """How one dataclass field is read from a recipe: its kind, its bounds, its choices, and a
    conversion of what was read (e.g. the tuple `("all-linear",)` to the string)."""

    kind: Callable[[Any], Any]
    positive: bool = False
    at_most: float | None = None
    at_least: float | None = None  # with `at_most`: a closed range (where 0 is allowed)
    choices: tuple[Any, ...] = ()
    convert: Callable[[Any], Any] | None = None


def setting(default: Any, kind: Callable[[Any], Any], **how: Any) -> Any:
    """A dataclass field read from the recipe under its own name (`how`: the rest of `Setting`);
    the default is written once, here, and the docs' tables are tested against it."""
    return dataclasses.field(default=default, metadata={"setting": Setting(kind, **how)})


class SettingError(ValueError):
    """Raised by a settings dataclass's `__post_init__` for a value that does not fit the others."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


Settings = TypeVar("Settings")


def settings_of(cls: type) -> dict[str, tuple[Any, Setting]]:
    """The fields of `cls` read from a recipe: name -> (default, how)."""
    return {
        f.name: (f.default, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata
    }


def read_values(section: Section, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every `setting` field of `cls` read from `section` and checked (`skip`: fields this use of
    the settings does not take, refused as unknown keys by `close`): name -> value."""
    values = {}
    for name, (default, how) in settings_of(cls).items():
        if name in skip:
            continue
        value = (
            section.positive(name, how.kind, default, how.at_most)
            if how.positive
            else section.get(name, how.kind, default)
        )
        if how.choices and value not in how.choices:
            raise section.error(name, f"{value!r} is not one of {', '.join(map(str, how.choices))}")
        if how.at_least is not None and not how.at_least <= value <= how.at_most:
            raise section.error(name, f"must be in [{how.at_least:g}, {how.at_most:g}]")
        values[name] = how.convert(value) if how.convert is not None and name in section.data else value
    return values


def read_settings(
    section: Section, cls: type[Settings], skip: tuple[str, ...] = (), **given: Any
) -> Settings:
    """`cls` built from `section` (`read_values`), `where` set to the section's place and `given`
    passed as they are; errors are `FILE:LINE: KEY: what is wrong` (with did-you-mean)."""
    values = {**given, **read_values(section, cls, skip)}
    section.close()
    if "where" in {f.name for f in dataclasses.fields(cls)}:
        values["where"] = section.where()
    try:
        return cls(**values)
    except SettingError as err:
        raise section.error(err.key, str(err)) from None


def read_utf8(file: Path, error: type[Exception]) -> str:
    """The file as UTF-8 text, or `error` naming the line and byte that are not UTF-8."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise error(
            f"{file}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
        ) from None


def load_yaml(file: Path) -> Any:
    """The file's YAML, every mapping a `Mapping` that knows its lines; RecipeError if it is not YAML."""
    if not file.is_file():
        raise RecipeError(f"{file}: no such recipe file" + (" (it is a directory)" if file.is_dir() else ""))
    try:
        return yaml.load(read_utf8(file, RecipeError), Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise RecipeError(f"{file}:{mark.line + 1 if mark else 1}: not valid YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{file}: not valid YAML: {err}") from None
