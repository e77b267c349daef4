"""PartialAdamW: AdamW whose step writes trained PaCA columns straight into the dense weight."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.autograd.graph import increment_version

from . import ops
from .layers.partial import COLUMNS


class PartialAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW semantics (decoupled weight decay), one fused pass per trained tensor.

    For trained columns of a partial layer (PaCA, S2FT) the pass also writes the new columns into the
    layer's dense weight, so the next forward needs no separate scatter; trained rows are written by
    the layer's own sync. Moments are kept in float32 whatever the parameter dtype.
    Any other parameter gets the same update without the weight write.
    """

    keeps_partial_weights_in_sync = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        maximize: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"PartialAdamW needs lr, eps, weight_decay >= 0; got {lr}, {eps}, {weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"PartialAdamW betas must lie in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PartialAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(
                        p, dtype=torch.float32, memory_format=torch.contiguous_format
                    )
                    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state["step"] += 1
                owner = getattr(p, "_slimtune_owner", None)
                fused = owner is not None and owner.axis == COLUMNS
                weight, index = (owner.weight, owner.index) if fused else (None, None)
                ops.partial_adamw(
                    p,
                    p.grad.contiguous(),
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    weight,
                    index,
                    step=state["step"],
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                )
                # Kernels write through raw pointers: tell autograd and the layers that p changed.
                increment_version(p)
                if fused:
                    increment_version(weight)
                    owner.mark_synced()
                elif owner is not None:
                    owner.sync_()
        return loss
