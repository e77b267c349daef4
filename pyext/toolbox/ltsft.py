"""LT-SFT (Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL 2022): a
short dense phase finds the entries that move most; the model is reset and only those train, so the
fine-tune is a sparse diff (`slimtune.SparseDelta.between`) that composes with
others and reverts.

    start = slimtune.toolbox.params.snapshot(model)
    ...a few dense steps...
    masks = slimtune.toolbox.ltsft.top_k_masks(model, start, k=0.01)
    slimtune.toolbox.params.restore(model, start)
    hooks = slimtune.toolbox.ltsft.mask_gradients(model, masks)  # train with weight_decay=0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def top_k_masks(model: nn.Module, start: dict[str, Tensor], k: int | float) -> dict[str, Tensor]:
    """Boolean masks of the k entries (a count, or a fraction of all parameters) with the largest
    absolute change since `start`, over all parameters together."""
    names = [n for n, _ in model.named_parameters()]
    change = torch.cat([(model.get_parameter(n).detach() - start[n]).abs().flatten().float() for n in names])
    count = min(k if isinstance(k, int) else max(round(k * change.numel()), 1), change.numel())
    flat = torch.zeros(change.numel(), dtype=torch.bool, device=change.device)
    flat[change.topk(count).indices] = True
    masks, offset = {}, 0
    for name in names:
        size = start[name].numel()
        masks[name] = flat[offset : offset + size].view_as(start[name])
        offset += size
    return masks


def mask_gradients(model: nn.Module, masks: dict[str, Tensor]) -> list[Any]:
    """Zero every gradient outside the masks (with no weight decay, the other entries then stay at
    their values exactly); the hook handles, to remove when the sparse phase ends."""
    handles = []
    for name, parameter in model.named_parameters():
        mask = masks[name].to(parameter.dtype)
        handles.append(parameter.register_hook(lambda grad, mask=mask: grad * mask))
    return handles
