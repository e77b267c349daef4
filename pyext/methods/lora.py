"""LoRA and Hydra: plan adapter layers, fuse siblings that share an input, merge and unmerge exactly."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import HydraConfig, LoRAConfig
from ..layers.lora import (
    AdapterLinear,
    GatedMLPSpec,
    HydraLinear,
    LoRALinear,
    MergeRecord,
    SharedInput,
    fuse_mlp,
    restore_weight_,
    unfuse_mlp,
)
from ..targets import check_plain_linear, match_targets
from .base import Method, Plan, Replacement

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Child names that Hugging Face attention and MLP blocks call one after another on one input."""

UNMERGE_ATTR = "_slimtune_unmerge"


# The gated-MLP forwards of Hugging Face models, verbatim. A module whose forward compiles to the same
# bytecode computes down(act(gate(x)) * up(x)) and can take the fused path; any other keeps its own.
def _llama_mlp_forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _phi3_mlp_forward(self, hidden_states):
    up_states = self.gate_up_proj(hidden_states)

    gate, up_states = up_states.chunk(2, dim=-1)
    up_states = up_states * self.activation_fn(gate)

    return self.down_proj(up_states)


GATED_MLPS = (
    (_llama_mlp_forward, ("gate_proj", "up_proj"), "act_fn"),  # Llama, Mistral, Qwen2/3, Gemma, ...
    (_phi3_mlp_forward, ("gate_up_proj",), "activation_fn"),  # Phi-3
)


def _same_code(a: Any, b: Any) -> bool:
    a, b = getattr(a, "__code__", None), b.__code__
    return a is not None and all(
        getattr(a, k) == getattr(b, k) for k in ("co_code", "co_names", "co_varnames", "co_consts")
    )


def activation_kind(act: object) -> str | None:
    """The activation a module computes, as a key of ops.GLU_ACTIVATIONS, or None if not known."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):
        return "gelu_tanh"
    return "gelu" if name == "GELUActivation" else None


def gated_mlp_spec(module: nn.Module) -> GatedMLPSpec | None:
    """How to fuse `module` if it is a Hugging Face gated MLP with a known activation, else None."""
    for forward, inputs, act_name in GATED_MLPS:
        if _same_code(type(module).forward, forward):
            kind = activation_kind(getattr(module, act_name, None))
            return GatedMLPSpec(inputs, "down_proj", kind) if kind else None
    return None


@dataclass
class Fusion:
    """Which targeted layers run fused: sibling groups (by member name) and gated MLPs (by name)."""

    groups: dict[str, SharedInput] = field(default_factory=dict)
    mlps: dict[str, GatedMLPSpec] = field(default_factory=dict)

    @classmethod
    def plan(cls, model: nn.Module, names: list[str]) -> Fusion:
        targeted, fusion = set(names), cls()
        for parent_name, parent in model.named_modules():
            prefix = f"{parent_name}." if parent_name else ""
            spec = gated_mlp_spec(parent)
            if spec and all(prefix + child in targeted for child in (*spec.inputs, spec.down)):
                fusion.mlps[parent_name] = spec
                continue  # its gate/up run inside the fused MLP
            for siblings in SIBLINGS:
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
            fuse_mlp(model.get_submodule(name), spec)

    def remove(self, model: nn.Module) -> None:
        for name in self.mlps:
            unfuse_mlp(model.get_submodule(name))


def _generator(name: str, seed: int) -> torch.Generator:
    """Adapter init of module `name`: a pure function of (seed, name), device-independent."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


class AdapterMethod(Method):
    """Shared by LoRA and Hydra: validate everything, then build layers, fuse, merge exactly."""

    def make_layer(self, name: str, linear: nn.Linear, config: Any) -> AdapterLinear:
        raise NotImplementedError

    def plan(self, model: nn.Module, config: Any, saved: dict[str, Tensor] | None = None) -> Plan:
        targets = [
            (name, check_plain_linear(name, m)) for name, m in match_targets(model, config.target_modules)
        ]
        restored = {}
        if saved is not None:
            for name, linear in targets:
                restored[name] = self._saved(name, linear, config, saved)
        fusion = Fusion() if getattr(config, "dropout", 0.0) else Fusion.plan(model, [n for n, _ in targets])
        replacements = [
            Replacement(
                name, self._builder(name, linear, config, restored.get(name), fusion.groups.get(name))
            )
            for name, linear in targets
        ]
        return Plan(
            replacements, prepare=lambda: fusion.install(model), extra={"config": config, "fusion": fusion}
        )

    def trained_shapes(self, linear: nn.Linear, config: Any) -> dict[str, tuple[int, int]]:
        """The shape of each trained tensor of the layer built on `linear` (checked on load)."""
        raise NotImplementedError

    def _saved(
        self, name: str, linear: nn.Linear, config: Any, saved: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The checkpoint tensors of module `name`, checked against the shapes this model needs."""
        tensors = {}
        for key, expected in self.trained_shapes(linear, config).items():
            tensor = saved.get(f"{name}.{key}")
            if tensor is None:
                raise ValueError(f"the checkpoint has no tensor {key!r} for module {name!r}")
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

    def unpatch(self, model: nn.Module, layers: dict[str, nn.Module], extra: dict[str, Any]) -> None:
        """Merge every layer in place (exactly) and keep what `unmerge` needs on the model."""
        extra["fusion"].remove(model)
        records: dict[str, MergeRecord] = {}
        for name, layer in layers.items():
            linear, records[name] = layer.merge()
            model.set_submodule(name, linear)
        setattr(model, UNMERGE_ATTR, (extra["config"], records))


class LoRAMethod(AdapterMethod):
    name = "lora"

    def make_layer(self, name: str, linear: nn.Linear, config: LoRAConfig) -> LoRALinear:
        dtype = torch.float32 if config.fp32_master else None
        return LoRALinear(
            linear, config.r, config.alpha, config.dropout, dtype, _generator(name, config.seed)
        )

    def trained_shapes(self, linear: nn.Linear, config: LoRAConfig) -> dict[str, tuple[int, int]]:
        return {"lora_A": (config.r, linear.in_features), "lora_B": (linear.out_features, config.r)}


class HydraMethod(AdapterMethod):
    name = "hydra"

    def make_layer(self, name: str, linear: nn.Linear, config: HydraConfig) -> HydraLinear:
        dtype = torch.float32 if config.fp32_master else None
        return HydraLinear(
            linear, config.r_parallel, config.r_sequential, config.alpha, dtype, _generator(name, config.seed)
        )

    def trained_shapes(self, linear: nn.Linear, config: HydraConfig) -> dict[str, tuple[int, int]]:
        rp, rs, n_in, n_out = config.r_parallel, config.r_sequential, linear.in_features, linear.out_features
        return {
            "parallel_A": (rp, n_in),
            "parallel_B": (n_out, rp),
            "sequential_A": (rs, n_out),
            "sequential_B": (n_out, rs),
        }


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `slimtune.merge` of a LoRA or Hydra model: adapter layers back, base weights bit for bit.

    `merge` wrote W0 + delta into each base weight in place and kept, per layer, the adapter tensors and
    the few entries where rounding W' - delta does not give W0 back; this restores them. Refused (model
    untouched) if a merged weight was modified since.
    """
    from ..model import _check_model, commit  # model imports this package: import at call time
    from . import method_for

    record = getattr(model, UNMERGE_ATTR, None)
    if record is None:
        raise ValueError(
            f"{type(model).__name__} was not merged by slimtune.merge from a LoRA or Hydra model; "
            f"there is nothing to unmerge"
        )
    _check_model(model)
    config, records = record
    for name, rec in records.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if type(module) is not nn.Linear or module.weight._version != rec.version:
            raise ValueError(
                f"module {name!r} was replaced or modified since slimtune.merge; unmerge restores only "
                f"untouched merged weights"
            )
    saved = {f"{name}.{key}": t for name, rec in records.items() for key, t in rec.tensors.items()}
    plan = method_for(config).plan(model, config, saved)
    for name, rec in records.items():
        restore_weight_(model.get_submodule(name).weight, rec)
    delattr(model, UNMERGE_ATTR)
    return commit(model, config, plan)
