"""PaCA: pick `r` random input columns per targeted linear, reproducibly from the seed."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import quantized, seeding
from ..config import PaCAConfig, master_dtype
from ..layers.paca import PaCALinear
from ..layers.partial import COLUMNS
from ..layers.qpaca import QPaCALinear
from ..ops import check_index
from ..registry import FUSED_KERNELS, IN_PLACE, MERGE, SPARSE_DELTA, MethodInfo, register
from ..targets import check_base_linear, check_untied, match_targets
from .base import Method, Plan, Replacement


def column_index(name: str, in_features: int, r: int, seed: int) -> Tensor:
    """The sorted columns of module `name`: a pure function of (seed, name, shape), device-independent."""
    generator = seeding.generator(seed, name)
    return torch.randperm(in_features, generator=generator)[:r].sort().values


class PaCAMethod(Method):
    name = "paca"

    def plan(self, model: nn.Module, config: PaCAConfig, saved: dict[str, Tensor] | None = None) -> Plan:
        targets = match_targets(model, config.target_modules)
        plan = []
        for name, module in targets:
            linear = check_base_linear(name, module, takes_4bit=True)  # a 4-bit base trains as QPaCA
            if config.r > linear.in_features:
                raise ValueError(
                    f"PaCAConfig.r={config.r} exceeds the {linear.in_features} input columns of {name!r}; "
                    f"use r <= {linear.in_features} or exclude {name!r} from target_modules"
                )
            if saved is None:
                index, columns = column_index(name, linear.in_features, config.r, config.seed), None
            else:
                index, columns = self._saved_columns(name, linear, config.r, saved)
                if not torch.equal(index, column_index(name, linear.in_features, config.r, config.seed)):
                    raise ValueError(
                        f"checkpoint index of {name!r} is not the one PaCAConfig(seed={config.seed}) selects "
                        f"there: the checkpoint was edited or belongs to another model"
                    )
            # Saved columns go into a dense weight (a 4-bit one is never written).
            writes = None if columns is None or quantized.is_4bit(linear) else (index, COLUMNS)
            plan.append(Replacement(name, _builder(linear, index, columns, config), writes))
        check_untied(model, [r.name for r in plan], "PaCA")
        return Plan(plan)

    @staticmethod
    def _saved_columns(
        name: str, linear: nn.Linear, r: int, saved: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        try:
            index, columns = saved[f"{name}.index"], saved[f"{name}.trained"]
        except KeyError as err:
            raise ValueError(f"checkpoint has no tensor {err.args[0]!r} for module {name!r}") from None
        expected = (linear.out_features, r)
        if tuple(columns.shape) != expected or tuple(index.shape) != (r,):
            raise ValueError(
                f"checkpoint columns of {name!r} have shape {tuple(columns.shape)} but this model's layer "
                f"needs {expected}: the checkpoint belongs to another model"
            )
        try:
            check_index(index, linear.in_features, f"checkpoint index of {name!r}", distinct=True)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err}: the checkpoint belongs to another model, or is damaged") from None
        if not columns.is_floating_point():
            raise TypeError(f"checkpoint columns of {name!r} hold {columns.dtype} values; expected floats")
        return index, columns


def _builder(linear: nn.Linear, index: Tensor, columns: Tensor | None, config: PaCAConfig):
    def build() -> PaCALinear | QPaCALinear:
        if quantized.is_4bit(linear):
            layer = QPaCALinear(linear, index, config.scale)
            if columns is not None:
                with torch.no_grad():
                    layer.paca_columns.copy_(columns)
            return layer
        master = master_dtype(config.fp32_master, linear.weight.dtype)
        layer = PaCALinear(linear, index, master, config.scale)
        if columns is not None:
            with torch.no_grad():
                layer.paca_columns.copy_(columns)
            layer.sync_()
        return layer

    return build


register(
    MethodInfo(
        name="paca",
        config=PaCAConfig,
        glue=PaCAMethod(),
        layers=(PaCALinear, QPaCALinear),
        capabilities=frozenset({IN_PLACE, MERGE, SPARSE_DELTA, FUSED_KERNELS}),
        summary="r random input columns of every targeted linear, trained in place",
        sized=lambda budget, seed: PaCAConfig(r=budget, seed=seed),
        lr=5e-3,
    )
)
