"""QLoRA: LoRA on a 4-bit quantized base.

y = Q(x) + scaling * (dropout(x) A^T) B^T: the quantization library's own 4-bit product beside the
adapter's two small ones; the quantized weight stays frozen and untouched. The trained tensors are
LoRA's (`lora_A`, `lora_B`, float32 by default here as in QLoRA), so the layer saves, loads and
exports to PEFT as a LoRA layer does. Merging writes the delta into the dequantized weight and gives
a dense linear (the 4-bit weight cannot hold it); there is no unmerge back to 4 bits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import quantized
from .lora import LoRALinear, MergeRecord, _uniform


class QLoRALinear(LoRALinear):
    """Drop-in replacement of a 4-bit linear with a LoRA adapter (see the module docstring)."""

    quantized = True  # the weight is a 4-bit base: merged into a dense linear, never unmerged

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base.requires_grad_(False)
        self.shared = None  # never in a fused sibling group: the base product is the library's
        self.r, self.scaling, self.dropout = r, alpha / r, dropout
        device, dtype = base.weight.device, dtype or torch.float32
        self.lora_A = nn.Parameter(
            _uniform((r, self.in_features), self.in_features, generator).to(device, dtype)
        )
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.adapter(self.lora_A.dtype)
        h = F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x
        update = F.linear(F.linear(h.to(a.dtype), a), b)
        return quantized.product(self.base, x) + update.to(x.dtype)

    @torch.no_grad()
    def prepare_merge(self) -> tuple[nn.Linear, MergeRecord, Tensor]:
        """A dense linear holding the dequantized base (written with the merged weight by the caller),
        its record (marked: no unmerge back to 4 bits) and W0 + B A rounded once from float64."""
        weight = quantized.dequantized(self.base)
        a, b = self.adapter(torch.float64)
        merged = (weight.double() + b @ a).to(weight.dtype)
        empty = torch.empty(0, dtype=torch.long)
        record = MergeRecord(self.checkpoint_tensors(), b, a, empty, weight.new_empty(0), -1, quantized=True)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.base.bias is not None:
            linear.bias = nn.Parameter(self.base.bias.detach().to(weight.dtype), requires_grad=False)
        return linear, record, merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={quantized.describe(self.base)}"
