"""PartialAdamW: AdamW whose step writes trained PaCA columns straight into the dense weight."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

from . import library, sharding
from .layers.partial import COLUMNS, PartialLinear


class PartialAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW semantics (decoupled weight decay), one fused pass per trained tensor.

    Bound to its layers explicitly: `PartialAdamW(model, lr=...)` trains the model's trainable
    parameters and knows its partial layers (PaCA, S2FT); `PartialAdamW(params, layers=model)`
    does the same for chosen parameters. For trained columns of a bound layer the pass also writes
    the new columns into the layer's dense weight, so the next forward needs no separate scatter;
    trained rows, and the tensors of unbound layers, are written by the layer's own sync at its
    next forward. Moments are kept in float32 whatever the parameter dtype. The binding is plain
    state (a list of layers), so the optimizer deep-copies and pickles with its model.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        maximize: bool = False,
        layers: nn.Module | Iterable[nn.Module] | None = None,
    ) -> None:
        hyper = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        for name, value in hyper.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"PartialAdamW {name} must be a finite number >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"PartialAdamW {name} must be >= 0, got {value}")
        if not all(isinstance(b, int | float) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"PartialAdamW betas must lie in [0, 1), got {betas}")
        if isinstance(params, nn.Module):
            layers = params if layers is None else layers
            params = [p for p in params.parameters() if p.requires_grad]
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)
        if isinstance(layers, nn.Module):
            layers = layers.modules()
        self.layers: list[PartialLinear] = [m for m in layers or () if isinstance(m, PartialLinear)]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "layers": self.layers}  # torch keeps only groups and state

    def __setstate__(self, state: dict) -> None:
        layers = state.pop("layers", [])
        super().__setstate__(state)
        self.layers = layers

    def _owners(self) -> dict[int, PartialLinear]:
        return {id(layer.trained): layer for layer in self.layers}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owners = self._owners()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, owners.get(id(p)))
        return loss

    def _moments(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """The parameter's float32 moments (under FSDP2 DTensors sharded like it), made at its first step."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        return state["exp_avg"], state["exp_avg_sq"]

    def _update(self, p: Tensor, group: dict, owner: PartialLinear | None) -> None:
        """One AdamW step of `p`. Under FSDP2 the parameter, its gradient and its moments are DTensors
        sharded alike and AdamW is elementwise, so each rank steps its own shard; the owner's weight
        shard then takes the entries after the step (`slimtune.sharding`), never from the kernel."""
        if p.grad.is_sparse:
            raise RuntimeError("PartialAdamW does not support sparse gradients")
        exp_avg, exp_avg_sq = self._moments(p)
        sharded = owner is not None and owner.sharded
        # Fused: the kernel mirrors the new columns into the weight (same dtype, no scale).
        fused = owner is not None and not sharded and owner.axis == COLUMNS and not owner.master
        fused = fused and owner.scale == 1.0
        weight, index = (owner.weight, owner.index) if fused else (None, None)
        beta1, beta2 = group["betas"]
        local = sharding.local(p)
        library.partial_adamw_(
            local,
            sharding.local(p.grad).contiguous(),
            sharding.local(exp_avg),
            sharding.local(exp_avg_sq),
            weight,
            index,
            self.state[p]["step"],
            group["lr"],
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
            group["maximize"],
        )
        # Kernels write through raw pointers: tell autograd and the layers that p changed.
        increment_version(local)
        if fused:
            increment_version(weight)
            owner.mark_synced(by_owner=True)
        elif owner is not None and not sharded:
            owner.sync_(force=True, by_owner=True)
