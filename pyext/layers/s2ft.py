"""S2FT layer: a frozen dense linear whose co-permuted, contiguous block of columns or rows trains."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .partial import PartialLinear


class S2FTLinear(PartialLinear):
    """Drop-in `nn.Linear` replacement training the block `weight[:, index]` or `weight[index, :]`.

    After S2FT's co-permutation `index` is a contiguous range (two ranges for Phi-3's fused
    gate_up rows), so the saved input of a column block is one contiguous slice of x.
    """

    trained_name = "s2ft_block"
    index_name = "s2ft_index"

    def __init__(
        self, base: nn.Linear, index: Tensor, axis: int, master_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(base, index, axis, master_dtype)
