"""Half Fine-Tuning (Hui et al., "HFT: Half Fine-Tuning for Large Language Models", 2024): each stage
trains a fresh random half of every transformer block by category and freezes the rest, which keeps
half of what the model knew untouched per stage.

    trained = slimtune.toolbox.hft.freeze(model, seed=stage_number)  # requires_grad set in place
    optimizer = torch.optim.AdamW(trained, lr=1e-5)  # a fresh optimizer per stage (the paper's)
"""

from __future__ import annotations

import random

from torch import nn

from ..architectures import architecture, block_stacks, hft_categories


def check(model: nn.Module) -> None:
    """Refuse a model whose blocks HFT cannot halve (4 attention projections, 3 FFN projections)."""
    stacks = block_stacks(model)
    if not stacks:
        raise ValueError(f"hft found no transformer blocks in {type(model).__name__}")
    categories = hft_categories(stacks[0][1][0], architecture(model))
    if len(categories["attention"]) != 4 or len(categories["ffn"]) != 3:
        raise ValueError(
            f"hft picks 2 of 4 attention projections and 1-2 of 3 FFN projections per block; a block of "
            f"{type(model).__name__} has attention {categories['attention']} and FFN {categories['ffn']}"
        )


def select(model: nn.Module, seed: int) -> set[str]:
    """Names of the parameters HFT trains for `seed`: half of every block by category, all outside blocks.

    Per block: 2 of the 4 attention projections, half of the norms, and 2 of the 3 FFN projections
    in a random half of the blocks, 1 of 3 in the others.
    """
    rng = random.Random(f"hft:{seed}")
    (prefix, blocks), *_ = block_stacks(model)
    wide = set(rng.sample(range(len(blocks)), len(blocks) // 2))
    chosen = []
    for number, block in enumerate(blocks):
        categories = hft_categories(block, architecture(model))
        picks = {"attention": 2, "ffn": 2 if number in wide else 1, "norm": len(categories["norm"]) // 2}
        for category, count in picks.items():
            chosen += [f"{prefix}.{number}.{m}." for m in rng.sample(categories[category], count)]
    in_blocks = f"{prefix}."
    return {
        name
        for name, _ in model.named_parameters()
        if not name.startswith(in_blocks) or any(name.startswith(c) for c in chosen)
    }


def freeze(model: nn.Module, seed: int) -> list[nn.Parameter]:
    """Train exactly `select(model, seed)` (requires_grad set in place); the parameters to optimise."""
    check(model)
    selected = select(model, seed)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in selected)
    return [p for p in model.parameters() if p.requires_grad]
