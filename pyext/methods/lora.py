"""LoRA and Hydra: plan adapter layers, fuse siblings that share an input, merge and unmerge exactly."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .. import quantized, seeding
from ..architectures import (
    GatedMLPSpec,
    architecture,
    gated_mlp_candidate,
    mlp_layout,
    probe_gated_mlp,
    sibling_groups,
)
from ..config import HydraConfig, LoRAConfig
from ..layers.lora import (
    AdapterLinear,
    FusedGatedMLP,
    HydraLinear,
    LoRALinear,
    MergeRecord,
    SharedInput,
    remerge_weight_,
    restore_weight_,
    undo_merge_,
    write_merge_,
)
from ..layers.qlora import QHydraLinear, QLoRALinear
from ..registry import FUSED_KERNELS, MERGE, PEFT_FORMAT, UNMERGE, MethodInfo, register
from ..targets import check_base_linear, match_targets
from ..transaction import Transaction
from .base import MERGE_RECORD, Method, Plan, Replacement, Step


@dataclass
class Fusion:
    """Which targeted layers run fused: sibling groups (by member name), gated MLPs (by name), and
    the gated MLPs that run unfused, with the reason (reported once at apply and by `report`)."""

    groups: dict[str, SharedInput] = field(default_factory=dict)
    mlps: dict[str, GatedMLPSpec] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def plan(cls, model: nn.Module, names: list[str]) -> Fusion:
        arch, targeted, fusion = architecture(model), set(names), cls()
        for parent_name, parent in model.named_modules():
            prefix = f"{parent_name}." if parent_name else ""
            spec, why = gated_mlp_candidate(parent, arch)
            layout = mlp_layout(parent, arch)
            if layout is not None and all(prefix + c in targeted for c in (*layout.inputs, layout.down)):
                problem = why if spec is None else probe_gated_mlp(parent, spec)
                if spec is not None and (problem is None or "meta" in problem):
                    fusion.mlps[parent_name] = spec
                    continue  # its gate/up run inside the fused MLP
                fusion.fallbacks[parent_name] = f"{type(parent).__name__}: {problem}"
            for siblings in sibling_groups(parent, arch):
                members = [prefix + child for child in siblings if prefix + child in targeted]
                if (
                    len(members) > 1
                    and len({parent.get_submodule(m[len(prefix) :]).in_features for m in members}) == 1
                ):
                    group = SharedInput(members)
                    fusion.groups.update(dict.fromkeys(members, group))
        return fusion

    def install(self, model: nn.Module) -> None:
        for name, spec in self.mlps.items():
            model.set_submodule(name, FusedGatedMLP(model.get_submodule(name), spec))
        if self.fallbacks:
            reasons = sorted(set(self.fallbacks.values()))
            warnings.warn(
                f"slimtune: {len(self.fallbacks)} gated MLPs run the unfused (exact, slower) adapter path: "
                f"{'; '.join(reasons)}. slimtune.report(model) lists them",
                stacklevel=4,
            )

    def remove(self, model: nn.Module) -> None:
        for name in self.mlps:
            model.set_submodule(name, model.get_submodule(name).restore())

    def describe(self) -> dict[str, Any]:
        groups = {id(g): g.names for g in self.groups.values()}
        return {
            "fused gated MLPs": sorted(self.mlps),
            "sibling groups sharing one input": sorted(groups.values()),
            "unfused gated MLPs": dict(sorted(self.fallbacks.items())),
        }


@dataclass
class AdapterRecord:
    """What an adapter method's plan did: its config (kept by merge for `unmerge`), the fused
    groups it installed (`describe`, removed on merge) and, for CorDA, each layer's initial factors
    (A0, B0) that the residual base lacks (saved in checkpoints; PEFT export writes them back)."""

    config: Any
    fusion: Fusion
    corda: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


class AdapterMethod(Method):
    """Shared by LoRA and Hydra: validate everything, then build layers, fuse, merge exactly."""

    takes_4bit = False  # whether the method trains on 4-bit bases (QLoRA)

    def make_layer(self, name: str, linear: nn.Linear, config: Any) -> AdapterLinear:
        raise NotImplementedError

    @staticmethod
    def adapter_dtype(linear: nn.Module, config: Any) -> torch.dtype | None:
        """float32 masters if asked; else the base's dtype (None), which a 4-bit base reads from the
        dtype it was quantized from."""
        if config.fp32_master:
            return torch.float32
        return quantized.dtype(linear) if quantized.is_4bit(linear) else None

    def plan(self, model: nn.Module, config: Any, saved: dict[str, Tensor] | None = None) -> Plan:
        targets = [
            (name, check_base_linear(name, m, self.takes_4bit))
            for name, m in match_targets(model, config.target_modules)
        ]
        restored = {}
        if saved is not None:
            for name, linear in targets:
                restored[name] = self._saved(name, linear, config, saved)
        dense = [n for n, m in targets if not quantized.is_4bit(m)]  # a 4-bit base runs its library's product
        fusion = Fusion() if getattr(config, "dropout", 0.0) else Fusion.plan(model, dense)
        replacements = [
            Replacement(
                name, self._builder(name, linear, config, restored.get(name), fusion.groups.get(name))
            )
            for name, linear in targets
        ]
        return Plan(replacements, [Step(partial(fusion.install, model))], AdapterRecord(config, fusion))

    def trained_shapes(self, linear: nn.Linear, config: Any) -> dict[str, tuple[int, int]]:
        """The shape of each trained tensor of the layer built on `linear` (checked on load)."""
        raise NotImplementedError

    def _saved(
        self,
        name: str,
        linear: nn.Linear,
        config: Any,
        saved: dict[str, Tensor],
        shapes: dict[str, tuple[int, int]] | None = None,
    ) -> dict[str, Tensor]:
        """The checkpoint tensors of module `name` (the trained ones, or `shapes`' keys), checked
        against the shapes this model needs."""
        tensors = {}
        for key, expected in (shapes or self.trained_shapes(linear, config)).items():
            tensor = saved.get(f"{name}.{key}")
            if tensor is None:
                raise ValueError(f"the checkpoint has no tensor {key!r} for module {name!r}")
            if not tensor.is_floating_point():
                raise TypeError(
                    f"the checkpoint's {key} of {name!r} holds {tensor.dtype} values; expected floats"
                )
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"the checkpoint's {key} of {name!r} has shape {tuple(tensor.shape)} but this model's "
                    f"layer needs {expected}: the checkpoint belongs to another model or another rank"
                )
            tensors[key] = tensor
        return tensors

    def _builder(
        self,
        name: str,
        linear: nn.Linear,
        config: Any,
        tensors: dict[str, Tensor] | None,
        group: SharedInput | None,
    ):
        def build() -> AdapterLinear:
            layer = self.make_layer(name, linear, config)
            if tensors is not None:
                layer.load_trained_(tensors)
            if group is not None:
                group.add(layer)
            return layer

        return build

    def unmerge_steps(
        self, model: nn.Module, config: Any, records: dict[str, MergeRecord]
    ) -> tuple[dict[str, Tensor], list[Step]]:
        """What `slimtune.unmerge` needs to rebuild the adapters (their saved tensors) and the steps that
        give every base weight back bit for bit; refused (model untouched) where it cannot."""
        if getattr(config, "init", "random") != "random":
            raise ValueError(
                f"unmerge does not rebuild CorDA adapters (LoRAConfig(init={config.init!r})): reload the "
                f"checkpoint saved before merge with slimtune.load onto the original base model"
            )
        if any(record.quantized for record in records.values()):
            raise ValueError(
                "unmerge cannot give back 4-bit weights: the model was merged from a 4-bit base (QLoRA) into "
                "dense ones; reload the 4-bit model and the checkpoint saved before merge with slimtune.load"
            )
        for name, record in records.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            if type(module) is not nn.Linear or module.weight._version != record.version:
                raise ValueError(
                    f"module {name!r} was replaced or modified since slimtune.merge; unmerge restores only "
                    f"untouched merged weights"
                )
        saved = {f"{name}.{key}": t for name, record in records.items() for key, t in record.tensors.items()}
        restores = [
            Step(partial(restore_weight_, weight, record), partial(remerge_weight_, weight, record))
            for weight, record in ((model.get_submodule(n).weight, r) for n, r in records.items())
        ]
        restores.append(Step(partial(delattr, model, MERGE_RECORD)))
        return saved, restores

    def unpatch(
        self, model: nn.Module, layers: dict[str, nn.Module], extra: AdapterRecord, transaction: Transaction
    ) -> None:
        """Merge every layer in place (exactly) and keep what `unmerge` needs on the model."""
        extra.fusion.remove(model)
        records: dict[str, MergeRecord] = {}
        for name, layer in layers.items():
            linear, records[name], merged = layer.prepare_merge()
            transaction.on_rollback(partial(undo_merge_, linear.weight, records[name]))
            write_merge_(linear.weight, records[name], merged)
            model.set_submodule(name, linear)
        setattr(model, MERGE_RECORD, (extra.config, records))

    def describe(self, extra: AdapterRecord) -> dict[str, Any]:
        return extra.fusion.describe()


CORDA_FACTORS = ("corda_A", "corda_B")  # a CorDA checkpoint's initial factors, per layer


class LoRAMethod(AdapterMethod):
    """LoRA; with a CorDA `init` the base weights become residuals W - s B0 A0 of the initial factors,
    which a checkpoint keeps (`<module>.corda_A`, `.corda_B`) so that it reloads onto the original
    base model (see `slimtune.corda`)."""

    name = "lora"
    takes_4bit = True

    def plan(self, model: nn.Module, config: LoRAConfig, saved: dict[str, Tensor] | None = None) -> Plan:
        plan = super().plan(model, config, saved)
        if config.init == "random":
            return plan
        for replacement in plan.replacements:
            check_dense_for_corda(replacement.name, model.get_submodule(replacement.name), config.init)
        if saved is None:
            raise ValueError(
                f"LoRAConfig(init={config.init!r}) builds the adapter from input covariances: use "
                f"slimtune.corda.apply(model, config, slimtune.corda.covariances(model, batches))"
            )
        factors, residuals = {}, []
        for replacement in plan.replacements:
            name, linear = replacement.name, model.get_submodule(replacement.name)
            a0, b0 = self._initial(name, linear, config, saved)
            factors[name] = (a0, b0)
            residuals.append(Step(partial(_to_residual, linear, a0, b0, config.alpha / config.r)))
        plan.steps[:0] = residuals  # before the layers are built on the (residual) weights
        plan.extra.corda = factors
        return plan

    def _initial(
        self, name: str, linear: nn.Linear, config: LoRAConfig, saved: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        # A0 and B0 have the shapes of lora_A and lora_B.
        shapes = dict(zip(CORDA_FACTORS, self.trained_shapes(linear, config).values(), strict=True))
        found = self._saved(name, linear, config, saved, shapes)
        return found["corda_A"], found["corda_B"]

    def checkpoint_tensors(self, layers: dict[str, nn.Module], extra: AdapterRecord) -> dict[str, Tensor]:
        tensors = super().checkpoint_tensors(layers, extra)
        for name, (a0, b0) in extra.corda.items():
            tensors.update(zip((f"{name}.{key}" for key in CORDA_FACTORS), (a0, b0), strict=True))
        return tensors

    def make_layer(self, name: str, linear: nn.Linear, config: LoRAConfig) -> LoRALinear:
        layer = QLoRALinear if quantized.is_4bit(linear) else LoRALinear
        dtype, generator = self.adapter_dtype(linear, config), seeding.generator(config.seed, name)
        return layer(linear, config.r, config.alpha, config.dropout, dtype, generator)

    def trained_shapes(self, linear: nn.Linear, config: LoRAConfig) -> dict[str, tuple[int, int]]:
        return {"lora_A": (config.r, linear.in_features), "lora_B": (linear.out_features, config.r)}


def check_dense_for_corda(name: str, module: nn.Module, init: str) -> None:
    """Refuse CorDA on a 4-bit base: it rewrites the base weight into a residual."""
    if quantized.is_4bit(module):
        raise ValueError(
            f"module {name!r} is a 4-bit base: CorDA (LoRAConfig(init={init!r})) rewrites base weights "
            f"into residuals, which a quantized weight cannot hold; use init='random' (QLoRA) or a dense "
            f"model"
        )


def residual(weight: Tensor, a0: Tensor, b0: Tensor, scaling: float) -> Tensor:
    """W - s B0 A0 in float64, rounded once to the weight's dtype (the same bits on every reload)."""
    delta = scaling * (b0.to(weight.device, torch.float64) @ a0.to(weight.device, torch.float64))
    return (weight.detach().double() - delta).to(weight.dtype)


def _to_residual(linear: nn.Linear, a0: Tensor, b0: Tensor, scaling: float) -> None:
    # A new Parameter rather than an in-place write: the transaction puts the original one back.
    linear.weight = nn.Parameter(residual(linear.weight, a0, b0, scaling), requires_grad=False)


class HydraMethod(AdapterMethod):
    name = "hydra"
    takes_4bit = True

    def make_layer(self, name: str, linear: nn.Linear, config: HydraConfig) -> HydraLinear:
        layer = QHydraLinear if quantized.is_4bit(linear) else HydraLinear
        return layer(
            linear,
            config.r_parallel,
            config.r_sequential,
            config.alpha,
            self.adapter_dtype(linear, config),
            seeding.generator(config.seed, name),
        )

    def trained_shapes(self, linear: nn.Linear, config: HydraConfig) -> dict[str, tuple[int, int]]:
        rp, rs, n_in, n_out = config.r_parallel, config.r_sequential, linear.in_features, linear.out_features
        return {
            "parallel_A": (rp, n_in),
            "parallel_B": (n_out, rp),
            "sequential_A": (rs, n_out),
            "sequential_B": (n_out, rs),
        }


register(
    MethodInfo(
        name="lora",
        config=LoRAConfig,
        glue=LoRAMethod(),
        layers=(LoRALinear,),
        capabilities=frozenset({MERGE, UNMERGE, FUSED_KERNELS, PEFT_FORMAT}),
        summary="a low-rank adapter on every targeted linear, fused into the base GEMM",
        sized=lambda budget, seed: LoRAConfig(r=budget, alpha=2 * budget, seed=seed),
        lr=5e-3,
    )
)
register(
    MethodInfo(
        name="hydra",
        config=HydraConfig,
        glue=HydraMethod(),
        layers=(HydraLinear,),
        capabilities=frozenset({MERGE, UNMERGE, FUSED_KERNELS}),
        summary="parallel and sequential low-rank branches (the rank split between them), fused",
        sized=lambda budget, seed: HydraConfig(
            max(1, budget // 2), max(1, budget // 2), alpha=2 * max(1, budget // 2), seed=seed
        ),
        lr=5e-3,
    )
)
