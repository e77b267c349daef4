"""Diagnostics of what fine-tuning did to the weights.

Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
2024): a top-k left singular vector of a fine-tuned matrix is an intruder when its highest absolute
cosine similarity with any left singular vector of the pre-trained matrix is below a threshold,
i.e. fine-tuning added a high-ranking direction the pre-trained matrix did not have. The paper
reports them for LoRA much more than for full fine-tuning, and ties them to forgetting.

The SVDs run in float32 on the weights' device, batched over matrices of the same shape, and are
exact on both sides: a randomized low-rank SVD of the fine-tuned matrix (tried first) is not exact
enough where singular values decay slowly, as in pre-trained LLM weights, and then counted most
top vectors of an unchanged matrix as intruders.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from .config import TargetModules
from .targets import match_targets


@torch.no_grad()
def intruder_dimensions(
    base: nn.Module,
    tuned: nn.Module,
    k: int = 10,
    threshold: float = 0.5,
    target_modules: TargetModules = "all-linear",
    batch: int = 16,
) -> dict[str, int]:
    """Per targeted linear (by module name): how many of the tuned weight's top-k left singular
    vectors have no pre-trained left singular vector with |cosine| >= `threshold`.

    `base` and `tuned` are plain models of the same architecture (merge slimtune layers first).
    """
    if not (isinstance(k, int) and k >= 1) or not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"intruder_dimensions needs an int k >= 1 and a threshold in (0, 1], got {k}, {threshold}"
        )
    pairs: dict[tuple[int, ...], list[tuple[str, Tensor, Tensor]]] = defaultdict(list)
    for name, module in match_targets(base, target_modules):
        other = tuned.get_submodule(name)
        weight, tuned_weight = getattr(module, "weight", None), getattr(other, "weight", None)
        if weight is None or tuned_weight is None or weight.dim() != 2 or weight.shape != tuned_weight.shape:
            raise ValueError(
                f"module {name!r} has no 2-D weight of the same shape in both models; intruder dimensions "
                f"compare plain linears (call slimtune.merge on a patched model first)"
            )
        pairs[tuple(weight.shape)].append((name, weight, tuned_weight))
    counts = {}
    for shape, group in pairs.items():
        top = min(k, *shape)
        for start in range(0, len(group), batch):
            part = group[start : start + batch]
            base_u = torch.linalg.svd(torch.stack([w.float() for _, w, _ in part]), full_matrices=False).U
            tuned = torch.stack([t.float().to(w.device) for _, w, t in part])
            tuned_u = torch.linalg.svd(tuned, full_matrices=False).U[..., :top]
            best = (base_u.transpose(-1, -2) @ tuned_u).abs().amax(dim=-2)  # (b, top)
            for (name, _, _), row in zip(part, (best < threshold).sum(-1).tolist(), strict=True):
                counts[name] = int(row)
    return counts
