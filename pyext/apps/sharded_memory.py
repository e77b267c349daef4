"""What one of N FSDP2 processes holds of a training step, from the 1-process accounting.

`fully_shard` cuts every parameter into N dim-0 chunks of ceil(rows / N) rows (padded: rank 0 always
holds a whole chunk, so it is the largest), and each gradient and each optimizer-state tensor shaped
like its parameter the same way; buffers stay whole on every process. Those shares are exact
(`tests/test_profile.py` checks them against a 2-process FSDP2 run). During the step FSDP2 also
holds unsharded copies: the root's own parameters (embeddings, final norm, head: the root keeps them
gathered through forward and backward), up to two blocks' parameters (the one running and the one
prefetched) and one block's unreduced gradients; the peak per process adds those to the 1-process
peak minus what sharding saves, and is a model, said as such wherever it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import slimtune
from torch import Tensor, nn


def shard_bytes(tensor: Tensor, world: int) -> int:
    """The bytes of rank 0's dim-0 chunk of `tensor` (a whole tensor if it has no dimension)."""
    if tensor.dim() == 0:
        return tensor.element_size()
    rows = -(-tensor.shape[0] // world)
    return rows * (tensor.numel() // max(tensor.shape[0], 1)) * tensor.element_size()


def _full(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class RankShare:
    """Rank 0's bytes under FSDP2 with `world` processes (see the module docstring)."""

    world: int
    weights: int  # parameter shards and whole buffers
    gradients: int  # gradient shards of the trained parameters
    optimizer: int  # optimizer-state shards
    unsharded: int  # gathered during the step: root parameters, two blocks, one block's gradients (modelled)

    def peak(self, peak: int, weights: int, gradients_at_peak: int, gradients: int, optimizer: int) -> int:
        """The modelled per-process peak from the 1-process one (`weights`, `gradients`, `optimizer`:
        the 1-process totals; `gradients_at_peak`: what of them was live at the peak)."""
        kept = self.gradients / gradients if gradients else 0.0
        saved = (weights - self.weights) + (optimizer - self.optimizer) + gradients_at_peak * (1 - kept)
        return int(peak - saved + self.unsharded)


def rank_share(model: nn.Module, optimizer, world: int) -> RankShare:
    """Rank 0's share of `model` (one block per `fully_shard`, then the root) and of `optimizer`'s
    state, which must exist (after a step)."""
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    state = [
        (p, v) for p, entries in (optimizer.state.items() if optimizer else ()) for v in entries.values()
    ]
    blocks = [block for _, stack in slimtune.architectures.block_stacks(model) for block in stack]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = [p for p in params if id(p) not in in_blocks]
    gathered = [
        _full(list(b.parameters())) - sum(shard_bytes(p, world) for p in b.parameters()) for b in blocks
    ]
    grads = [_full([p for p in b.parameters() if p.requires_grad]) for b in blocks]
    unsharded = _full(root) - sum(shard_bytes(p, world) for p in root)
    unsharded += sum(sorted(gathered)[-2:]) + max(grads, default=0)
    return RankShare(
        world=world,
        weights=sum(shard_bytes(p, world) for p in params) + _full(list(model.buffers())),
        gradients=sum(shard_bytes(p, world) for p in trained),
        optimizer=sum(
            shard_bytes(v, world) if v.shape == p.shape else v.numel() * v.element_size()
            for p, v in state
            if isinstance(v, Tensor)
        ),
        unsharded=unsharded,
    )
