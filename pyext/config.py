"""Method configurations: one frozen dataclass per fine-tuning method, serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

TargetModules = str | tuple[str, ...]


def _normalise_targets(target_modules: str | list[str] | tuple[str, ...]) -> TargetModules:
    """Accept a regex/"all-linear" string or a list of name suffixes; keep lists hashable."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError(
                "target_modules is empty: use 'all-linear', a regex, or a list of module-name suffixes"
            )
        return target_modules
    if isinstance(target_modules, list | tuple) and all(isinstance(t, str) and t for t in target_modules):
        if not target_modules:
            raise ValueError("target_modules is an empty list: name at least one module suffix")
        return tuple(target_modules)
    raise TypeError(
        f"target_modules must be 'all-linear', a regex string or a list of module-name suffixes, "
        f"got {target_modules!r}"
    )


@dataclass(frozen=True)
class MethodConfig:
    """Common base: the method's name and a JSON round trip for checkpoints."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return {"method": self.method, **out}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> MethodConfig:
        data = dict(data)
        method = data.pop("method", None)
        cls = CONFIG_CLASSES.get(method)
        if cls is None:
            raise ValueError(f"unknown slimtune method {method!r}; known: {sorted(CONFIG_CLASSES)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(
                f"unknown {method} config keys {sorted(unknown)}; expected a subset of {sorted(fields)}"
            )
        return cls(**data)


@dataclass(frozen=True)
class PaCAConfig(MethodConfig):
    """Partial connection adaptation: train `r` random input columns of every targeted linear.

    The trained tensor of a layer is exactly its selected weight columns (no rescaling), so an
    optimizer step on it is the dense step restricted to those columns.
    """

    method: ClassVar[str] = "paca"

    r: int
    target_modules: TargetModules = "all-linear"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"PaCAConfig.r must be an int (trained input columns per linear), got {self.r!r}")
        if self.r < 1:
            raise ValueError(f"PaCAConfig.r must be >= 1 (trained input columns per linear), got {self.r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"PaCAConfig.seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))


CONFIG_CLASSES: dict[str, type[MethodConfig]] = {PaCAConfig.method: PaCAConfig}
