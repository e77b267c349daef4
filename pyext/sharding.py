"""In-place methods and 4-bit bases under sharding engines: exact under FSDP2, else refused.

PaCA and S2FT keep their trained entries in a tensor of their own and write them into the dense
weight before a product reads it. A sharding engine gathers that weight for each forward and
backward and frees it after: entries written into the gathered copy are gone when backward gathers
it again, and the sharded weight never holds them (without this module, under FSDP2 the run leaves
the 1-process one from its third step: benchmarks/results/cpu-fsdp2-in-place-drift-2026-12-05.md).

Under FSDP2 (`fully_shard`) the entries are written into the weight's shards instead, never into
the gathered copies: after every `torch.optim` optimizer step that stepped a trained tensor (a
global step post-hook) and when the model meets FSDP2 first. FSDP2 shards a weight and its trained
columns (`out x r`) by the same rows, so PaCA's columns are written without communication; S2FT's
rows (`r x in`) are gathered and each rank writes the rows its shard holds. FSDP
(`FullyShardedDataParallel`) and DeepSpeed ZeRO-3 release the weight the same way and are refused
at the first forward, naming the engine and what works; DDP and ZeRO-1/2 need nothing. Layers on
4-bit bases (QPaCA, QLoRA, QHydra) shard under FSDP2 where the base is torchao's NF4 (it splits and
gathers its inner tensors); any other 4-bit base, or engine, is refused at the first forward.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import quantized
from .layers.partial import is_dtensor
from .registry import IN_PLACE, for_config
from .state import PatchState, patched_layers

FSDP2 = "FSDP2 (torch.distributed.fsdp.fully_shard)"
FSDP1 = "FSDP (torch.distributed.fsdp.FullyShardedDataParallel)"
ZERO3 = "DeepSpeed ZeRO-3"


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 turns a module's class into `FSDP<Class>` (a subclass of both)."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    return type(model)


def is_sharded(model: nn.Module) -> bool:
    """Whether an engine holds the model's parameters as DTensor shards (FSDP2, between forwards)."""
    return any(is_dtensor(p) for p in model.parameters())


def local(tensor: Tensor) -> Tensor:
    """This process's part of a tensor: a DTensor's local shard (same storage), else the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def gathered(tensor: Tensor) -> Tensor:
    """A tensor as one process holds it, on the CPU: a DTensor's shards gathered (a collective: every
    rank calls it)."""
    if is_dtensor(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def refuse_sharded(model: nn.Module, doing: str) -> None:
    """Refuse an operation that rewrites modules or reads whole weights of an FSDP2-sharded model."""
    if is_sharded(model):
        raise ValueError(
            f"{doing} of a model sharded by FSDP2 is not supported: save it with slimtune.save (every rank "
            f"calls it; rank 0 writes), then {doing.split()[0]} a 1-process copy loaded with slimtune.load"
        )


def engine(model: nn.Module, layers: list[nn.Module]) -> str | None:
    """The sharding engine that holds the layers' parameters (FSDP2, FSDP, ZeRO-3), or None. Cheap (a
    type test per layer and parameter), as it runs before every forward: FSDP2 leaves its modules
    FSDPModules and their parameters DTensors between forwards, FSDP and ZeRO-3 mark the
    parameters they manage."""
    if not torch.distributed.is_available():  # a build without torch.distributed shards nothing
        return None
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(model, FSDPModule):  # the root's own hook may have gathered everything already
        return FSDP2
    for layer in layers:
        if isinstance(layer, FSDPModule):
            return FSDP2
        for parameter in layer._parameters.values():
            if isinstance(parameter, DTensor):
                return FSDP2
            if _flattened(parameter):
                return FSDP1
            if hasattr(parameter, "ds_id"):
                return ZERO3
    return None


def _flattened(tensor: Tensor | None) -> bool:
    """Whether FSDP (FSDP1) manages `tensor`: it marks the parameters it flattens, and while it holds
    a module unsharded (its root's forward) the module's parameters are plain tensors (views of a
    flat parameter), never `nn.Parameter`s. (Told without reading `_base`, which breaks a compiled
    graph.)"""
    return bool(getattr(tensor, "_fsdp_flattened", False)) or (
        tensor is not None and not isinstance(tensor, nn.Parameter)
    )


class Guard:
    """The forward pre-hook of a model patched with an in-place method or on 4-bit bases: under FSDP2
    it keeps the sharded weights holding the trained entries; under an engine it cannot train under,
    it refuses."""

    def __init__(self, method: str, layers: list[nn.Module], in_place: bool) -> None:
        self.method, self.layers = method, layers  # the layer objects stay (engines wrap them in place)
        self.in_place, self.sharded = in_place, False
        # read now: an engine's shards no longer carry what tells the 4-bit formats apart
        bases = [layer.base for layer in layers if getattr(layer, "quantized", False)]
        self.kinds = sorted({quantized.describe(base) for base in bases})
        self.fsdp2_exact = all(quantized.shards_under_fsdp2(base) for base in bases)

    def _check_4bit(self, module: nn.Module, found: str) -> None:
        """FSDP2 shards torchao NF4 bases exactly; bitsandbytes' 4-bit bases and other engines: refused."""
        if found == FSDP2 and self.fsdp2_exact:
            return
        raise RuntimeError(
            f"{type(module).__name__} has 4-bit bases ({', '.join(self.kinds)}; QPaCA, QLoRA, QHydra), which "
            f"slimtune does not train under {found}; train it on one process or with "
            f"DistributedDataParallel (FSDP2 shards torchao NF4 bases)"
        )

    def __call__(self, module: nn.Module, args: Any) -> None:
        found = engine(module, self.layers)
        if found is not None and self.kinds:
            self._check_4bit(module, found)
        if not self.in_place:  # adapters on 4-bit bases: nothing written into weights
            return
        if (found == FSDP2) != self.sharded:  # the layers read gathered copies from now on (or no more)
            self.sharded = found == FSDP2
            for layer in self.layers:
                layer.sharded = self.sharded
        if found == FSDP2:
            _track(self.layers)
            return
        if found is not None:
            raise RuntimeError(
                f"{type(module).__name__} is patched with {self.method}, which writes its trained entries "
                f"into the dense weight, and {found} shards that weight and gathers it without them: it "
                f"would train silently wrong. Train {self.method} with DistributedDataParallel, DeepSpeed "
                f"ZeRO-1/2 or FSDP2 (fully_shard), or shard a LoRA or Hydra model"
            )


# Layers under FSDP2, written after each optimizer step, in the order they were met: the same on
# every rank (patch order), as S2FT's row writes gather and every rank must gather alike.
_SHARDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STEP_HOOK: list[Any] = []


def _track(layers: list[nn.Module]) -> None:
    """Bring every layer's shard up to date (where its parameters are still sharded) and have every
    later optimizer step write the entries it changed."""
    for layer in layers:
        if layer not in _SHARDED:
            _SHARDED[layer] = None
            layer.sync_()  # into the shards (FSDP2 gathered them already if it wraps the root alone:
            # then into the gathered copy, and the shards hold the entries since the patch)
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(_after_step))


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After any optimizer step: the entries of the sharded layers whose trained tensors it stepped
    into their weight shards (the next forward gathers them from there)."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_SHARDED):
        if id(layer.trained) in stepped:
            layer.sync_()


def install(model: nn.Module, state: PatchState) -> None:
    """Guard a model patched with an in-place method, or with layers on 4-bit bases (the hook's
    handle is kept in `state`)."""
    layers = list(patched_layers(model).values())
    in_place = for_config(state.config).has(IN_PLACE)
    if in_place or any(getattr(layer, "quantized", False) for layer in layers):
        state.shard_hook = model.register_forward_pre_hook(Guard(state.config.method, layers, in_place))


def uninstall(state: PatchState) -> None:
    if state.shard_hook is not None:
        state.shard_hook.remove()
        state.shard_hook = None
