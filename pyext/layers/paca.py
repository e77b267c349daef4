"""PaCA layer: a frozen dense linear whose `r` selected input columns train in place."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .partial import COLUMNS, PartialLinear


class PaCALinear(PartialLinear):
    """Drop-in `nn.Linear` replacement training the input columns `index` of its weight.

    Forward: one dense GEMM. Saved for backward: only x[..., index]. The trained tensor
    `paca_columns` (out x r) is `weight[:, index] / scale` (scale 1 unless PaCAConfig.alpha), in
    float32 for a half-precision weight with a master (see `PartialLinear`).
    """

    trained_name = "paca_columns"
    index_name = "paca_index"

    def __init__(
        self, base: nn.Linear, index: Tensor, master_dtype: torch.dtype | None = None, scale: float = 1.0
    ) -> None:
        super().__init__(base, index, COLUMNS, master_dtype, scale)
