"""PaCA layer: a frozen dense linear whose `r` selected input columns train in place."""

from __future__ import annotations

from torch import Tensor, nn

from .partial import COLUMNS, PartialLinear


class PaCALinear(PartialLinear):
    """Drop-in `nn.Linear` replacement training the input columns `index` of its weight.

    Forward: one dense GEMM. Saved for backward: only x[..., index]. The trained tensor
    `paca_columns` (out x r) is exactly `weight[:, index]`, with no rescaling.
    """

    trained_name = "paca_columns"
    index_name = "paca_index"

    def __init__(self, base: nn.Linear, index: Tensor) -> None:
        super().__init__(base, index, COLUMNS)
