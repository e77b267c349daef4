"""QPaCA: PaCA on a 4-bit quantized base (the PaCA paper's quantized variant).

The quantized weight stays frozen and untouched; the `r` selected input columns train as a float32
master `paca_columns` (out x r), taken at apply from the dequantized weight. The forward is the
quantization library's own 4-bit product plus one skinny correction product,

    y = Q(x) + x[..., idx] @ (scale * P - Dq)^T,

with Dq the dequantized selected columns, which equals the dense product with the weight's
selected columns replaced by `scale * P`. Saved for backward: the selected input columns and the
out x r correction (besides what the library's product keeps). The authors' form (dequantize the
whole weight, overwrite the columns, one dense product) gives the same result; which is faster is a
GPU question not measured yet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops, quantized
from .partial import COLUMNS


class QPaCALinear(nn.Module):
    """Drop-in replacement of a 4-bit linear training its input columns `index` (see the module
    docstring). Its checkpoint tensors are PaCA's (the index and the trained columns), so a QPaCA
    checkpoint loads into a PaCA model of the dense weights and back."""

    trained_name = "paca_columns"
    index_name = "paca_index"
    axis = COLUMNS
    quantized = True  # the weight is a 4-bit base (sharding engines are refused for it)

    def __init__(self, base: nn.Module, index: Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base
        base.requires_grad_(False)
        ops.check_index(index, self.in_features, "QPaCALinear (columns)", True)
        self.scale = float(scale)
        index = index.to(device=base.weight.device).clone()
        self.register_buffer(self.index_name, index)
        initial = quantized.dequantized(base).index_select(1, index)
        self.register_buffer("initial", initial, persistent=False)  # Dq: what the base computes with
        self.paca_columns = nn.Parameter(initial.float() / self.scale)

    @property
    def trained(self) -> nn.Parameter:
        return self.paca_columns

    @property
    def index(self) -> Tensor:
        return self.paca_index

    @property
    def r(self) -> int:
        return self.index.numel()

    def effective(self) -> Tensor:
        return self.trained if self.scale == 1.0 else self.trained * self.scale

    def forward(self, x: Tensor) -> Tensor:
        correction = (self.effective() - self.initial).to(x.dtype)
        return quantized.product(self.base, x) + F.linear(x.index_select(-1, self.index), correction)

    def change(self) -> Tensor:
        """The change of the selected columns since `apply`, exactly (float64)."""
        return self.effective().detach().double() - self.initial.double()

    def sync_(self, force: bool = False, by_owner: bool = False) -> None:
        """Nothing to write: the quantized weight is never written (the forward corrects it)."""

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        return {"index": self.index, "trained": self.trained.detach()}

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense `nn.Linear` holding the effective weight: the dequantized base with the trained
        columns written in, in the dtype the base was quantized from (or `dtype`)."""
        weight = quantized.dequantized(self.base)
        weight = weight.to(dtype or weight.dtype)
        weight.index_copy_(1, self.index, self.effective().detach().to(weight.dtype))
        return quantized.dense(self.base, weight)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, trained columns={self.r}, base={quantized.describe(self.base)}{scale}"
