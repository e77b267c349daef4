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
from .lora import LoRALinear, MergeRecord


class QLoRALinear(LoRALinear):
    """Drop-in replacement of a 4-bit linear with a LoRA adapter (see the module docstring)."""

    quantized = True  # the weight is a 4-bit base: merged into a dense linear, never unmerged

    def _hold(self, base: nn.Module) -> None:
        """Keep the whole 4-bit module, frozen: its library's product reads it (never fused)."""
        self.base = base.requires_grad_(False)

    def _adapter_parameter(self, tensor: Tensor, dtype: torch.dtype | None) -> nn.Parameter:
        """Adapters beside the 4-bit weight: float32 unless a dtype is given (QLoRA's masters)."""
        return nn.Parameter(tensor.to(device=self.base.weight.device, dtype=dtype or torch.float32))

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
        return quantized.dense(self.base, weight), record, merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={quantized.describe(self.base)}"
