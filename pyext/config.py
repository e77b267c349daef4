"""Method configurations: one frozen dataclass per fine-tuning method, serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

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


def _check_bool(owner: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner} must be True or False, got {value!r}")


def master_dtype(fp32_master: bool, weight_dtype: torch.dtype) -> torch.dtype | None:
    """float32 for the trained tensor of a half-precision weight when `fp32_master`, else None."""
    return torch.float32 if fp32_master and weight_dtype in (torch.bfloat16, torch.float16) else None


def _normalise_saved(modules: object) -> tuple[str, ...]:
    if isinstance(modules, list | tuple) and all(isinstance(m, str) and m for m in modules):
        return tuple(modules)
    raise TypeError(
        f"modules_to_save must be a list of module-name suffixes such as ['score'], got {modules!r}"
    )


@dataclass(frozen=True)
class MethodConfig:
    """Common base: the method's name, the modules trained in full beside it, a JSON round trip.

    `modules_to_save` (keyword-only, every method): module-name suffixes whose parameters train in
    full and are saved with the checkpoint, as PEFT's option of that name (see `full_modules`).
    """

    method: ClassVar[str] = ""
    modules_to_save: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules_to_save", _normalise_saved(self.modules_to_save))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return {"method": self.method, **out}

    @staticmethod
    def from_dict(data: dict[str, Any], classes: dict[str, type[MethodConfig]]) -> MethodConfig:
        """The config of `classes[data["method"]]` (the registry passes its configs)."""
        data = dict(data)
        method = data.pop("method", None)
        cls = classes.get(method)
        if cls is None:
            raise ValueError(f"unknown slimtune method {method!r}; known: {sorted(classes)}")
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

    By default the trained tensor of a layer is exactly its selected weight columns, so an
    optimizer step on it is the dense step restricted to those columns. `alpha` reparametrises as
    the PaCA authors' code does: the trained tensor is `W[:, idx] / (alpha / r)` and the weight
    holds `(alpha / r) * trained`, which makes each Adam step alpha / r times larger in the weight
    (4x at their r=16, alpha=64), so their learning rates carry over. `fp32_master` (default on)
    keeps the trained tensor in float32 when the weight is bfloat16/float16: the optimizer steps
    the float32 copy and the weight gets its rounded value (small steps do not round away).
    """

    method: ClassVar[str] = "paca"

    r: int
    target_modules: TargetModules = "all-linear"
    seed: int = 0
    alpha: float | None = None
    fp32_master: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"PaCAConfig.r must be an int (trained input columns per linear), got {self.r!r}")
        if self.r < 1:
            raise ValueError(f"PaCAConfig.r must be >= 1 (trained input columns per linear), got {self.r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"PaCAConfig.seed must be an int, got {self.seed!r}")
        if self.alpha is not None and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not 0 < self.alpha < float("inf")
        ):
            raise ValueError(
                f"PaCAConfig.alpha must be None (no rescaling) or a finite number > 0, got {self.alpha!r}"
            )
        _check_bool("PaCAConfig.fp32_master", self.fp32_master)
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))

    @property
    def scale(self) -> float:
        """The weight holds scale * trained: alpha / r, or 1 without `alpha`."""
        return 1.0 if self.alpha is None else self.alpha / self.r


def _check_units(owner: str, value: int | float) -> None:
    """A unit amount is an int count >= 0 or a float fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner} must be an int count or a float fraction in (0, 1], got {value!r}")
    if value < 0:
        raise ValueError(f"{owner} must not be negative, got {value}")
    if isinstance(value, float) and not 0 <= value <= 1:
        raise ValueError(f"{owner}={value} is a fraction > 1; use a fraction in (0, 1] or an int count")


@dataclass(frozen=True)
class S2FTConfig(MethodConfig):
    """Structured sparse fine-tuning: train a few attention heads and FFN channels of every block.

    `heads` and `channels` are each a fraction in (0, 1] of the block's units (at least one unit)
    or an int count; 0 turns that part off. By default the `o_proj` input columns of the selected
    heads and the `down_proj` input columns of the selected channels train; `train_v_rows` and
    `train_gate_up_rows` also train the matching `v_proj` rows and `gate_proj`/`up_proj` rows.
    `selection` is "random" (from `seed`) or "weight-norm" (the units with the largest output-side
    weight norms). `fp32_master` (default on) keeps the trained blocks of a bfloat16/float16 model
    in float32, as PaCA's option of that name.
    """

    method: ClassVar[str] = "s2ft"

    heads: int | float = 0
    channels: int | float = 0
    seed: int = 0
    train_v_rows: bool = False
    train_gate_up_rows: bool = False
    selection: str = "random"
    fp32_master: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_units("S2FTConfig.heads", self.heads)
        _check_units("S2FTConfig.channels", self.channels)
        if not self.heads and not self.channels:
            raise ValueError("S2FTConfig needs heads > 0 or channels > 0 (both are 0: nothing would train)")
        if self.selection not in ("random", "weight-norm"):
            raise ValueError(f"S2FTConfig.selection is 'random' or 'weight-norm', not {self.selection!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"S2FTConfig.seed must be an int, got {self.seed!r}")
        for name in ("train_v_rows", "train_gate_up_rows", "fp32_master"):
            _check_bool(f"S2FTConfig.{name}", getattr(self, name))
        if self.train_v_rows and not self.heads:
            raise ValueError("S2FTConfig.train_v_rows needs heads > 0 (the v rows follow the selected heads)")
        if self.train_gate_up_rows and not self.channels:
            raise ValueError("S2FTConfig.train_gate_up_rows needs channels > 0")


def _check_rank(owner: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner} must be an int (the adapter rank), got {value!r}")
    if value < 1:
        raise ValueError(f"{owner} must be >= 1 (the adapter rank; 8 to 64 is usual), got {value}")


def _check_adapter_common(owner: str, alpha: float, fp32_master: bool, seed: int) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < float("inf"):
        raise ValueError(f"{owner}.alpha must be a finite number > 0 (scaling = alpha / rank), got {alpha!r}")
    if not isinstance(fp32_master, bool):
        raise TypeError(f"{owner}.fp32_master must be True or False, got {fp32_master!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner}.seed must be an int, got {seed!r}")


LORA_INITS = ("random", "corda-kpm", "corda-ipm")


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA: y = W x + b + (alpha / r) B A x on every targeted linear, B zero at first (as in PEFT).

    A is drawn per layer from `seed` with PEFT's default (Kaiming-uniform) bounds. Adapter weights
    are kept in the model's dtype; `fp32_master=True` keeps float32 masters, cast per forward.
    `dropout` > 0 drops adapter inputs (as PEFT does) on a slower, unfused path. `init` "corda-kpm"
    or "corda-ipm" builds the adapter from the input covariance instead (`slimtune.corda.apply`;
    the base weight becomes the residual and a checkpoint keeps the initial factors).
    """

    method: ClassVar[str] = "lora"

    r: int
    alpha: float
    target_modules: TargetModules = "all-linear"
    dropout: float = 0.0
    fp32_master: bool = False
    seed: int = 0
    init: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank("LoRAConfig.r", self.r)
        if self.init not in LORA_INITS:
            raise ValueError(f"LoRAConfig.init is one of {', '.join(LORA_INITS)}, not {self.init!r}")
        _check_adapter_common("LoRAConfig", self.alpha, self.fp32_master, self.seed)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise TypeError(f"LoRAConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1) (0 turns it off), got {self.dropout}")
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))


@dataclass(frozen=True)
class HydraConfig(MethodConfig):
    """Hydra: a parallel and a sequential low-rank branch, y = W0 x + b + sp Bp Ap x + ss Bs As (W0 x).

    Each branch is scaled by alpha over its own rank (sp = alpha / r_parallel, ss = alpha /
    r_sequential; one s when the ranks match). Both B start at zero, so the model is unchanged at
    initialisation; the trained layer merges into the single weight (I + ss Bs As) W0 + sp Bp Ap.
    """

    method: ClassVar[str] = "hydra"

    r_parallel: int
    r_sequential: int
    alpha: float
    target_modules: TargetModules = "all-linear"
    fp32_master: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank("HydraConfig.r_parallel", self.r_parallel)
        _check_rank("HydraConfig.r_sequential", self.r_sequential)
        _check_adapter_common("HydraConfig", self.alpha, self.fp32_master, self.seed)
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))
