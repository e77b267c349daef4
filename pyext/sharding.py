"""Sharding engines that an in-place method cannot train under yet, refused at the first forward.

PaCA and S2FT keep their trained entries in a tensor of their own and write them into the dense
weight before a product reads it. FSDP2 (`fully_shard`), FSDP (`FullyShardedDataParallel`) and
DeepSpeed ZeRO-3 gather that weight for each forward and backward and free it after, so the written
entries are gone when backward re-gathers it, the sharded weight never holds them, and the engine
may replace the trained Parameter that slimtune tracks: the run leaves the 1-process one from its
third step (benchmarks/results/cpu-fsdp2-in-place-drift-2026-12-05.md: 1.5e-3 to 2.4e-3 in loss
after 5 steps, 4e-2 in PaCA's weights; FSDP and ZeRO-3 release the weight the same way and are
refused for that reason, not measured here). Until the sharded path exists, a patched model of an
in-place method refuses its forward under such an engine, naming it and what works; DDP, ZeRO-1/2,
and LoRA or Hydra under FSDP2 are not refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import IN_PLACE, for_config
from .state import PatchState, patched_layers

FSDP2 = "FSDP2 (torch.distributed.fsdp.fully_shard)"
FSDP1 = "FSDP (torch.distributed.fsdp.FullyShardedDataParallel)"
ZERO3 = "DeepSpeed ZeRO-3"


def engine(model: nn.Module, layers: list[nn.Module]) -> str | None:
    """The sharding engine that holds the layers' parameters, if one slimtune must refuse. Cheap (a
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
            if getattr(parameter, "_fsdp_flattened", False):
                return FSDP1
            if hasattr(parameter, "ds_id"):
                return ZERO3
    return None


class Guard:
    """The forward pre-hook that refuses an in-place method's model under a sharding engine."""

    def __init__(self, method: str, layers: list[nn.Module]) -> None:
        self.method, self.layers = method, layers  # the layer objects stay (engines wrap them in place)

    def __call__(self, module: nn.Module, args: Any) -> None:
        found = engine(module, self.layers)
        if found is not None:
            raise RuntimeError(
                f"{type(module).__name__} is patched with {self.method}, which writes its trained entries "
                f"into the dense weight, and {found} shards that weight and gathers it without them: it "
                f"would train silently wrong. Train {self.method} with DistributedDataParallel (torchrun + "
                f"`slimtune train`, or DDP yourself) or DeepSpeed ZeRO-1/2, or shard a LoRA or Hydra model "
                f"(they train exactly under FSDP2)"
            )


def install(model: nn.Module, state: PatchState) -> None:
    """Guard a model patched with an in-place method (the hook's handle is kept in `state`)."""
    if for_config(state.config).has(IN_PLACE):
        guard = Guard(state.config.method, list(patched_layers(model).values()))
        state.shard_hook = model.register_forward_pre_hook(guard)


def uninstall(state: PatchState) -> None:
    if state.shard_hook is not None:
        state.shard_hook.remove()
        state.shard_hook = None
