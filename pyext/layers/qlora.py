"""QLoRA and QHydra: LoRA and Hydra on a 4-bit quantized base.

    QLoRA:  y = Q(x) + scaling * (dropout(x) A^T) B^T
    QHydra: y = h + b + sp (x Ap^T) Bp^T + ss (h As^T) Bs^T,  h = Q(x) without the bias

Q is the quantization library's own 4-bit product; the quantized weight stays frozen and untouched.
The trained tensors are LoRA's and Hydra's (float32 by default here, as in QLoRA), so the layers save
and load as LoRA and Hydra layers do, and QLoRA exports to PEFT. Merging writes the delta into the
dequantized weight and gives a dense linear (the 4-bit weight cannot hold it); there is no unmerge
back to 4 bits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import quantized
from .lora import HydraLinear, LoRALinear, MergeRecord


class QuantizedAdapter:
    """What an adapter layer on a 4-bit base changes of its dense class (listed first among the bases):
    it holds the whole 4-bit module, keeps float32 adapters beside it, and merges into a dense linear."""

    quantized = True  # the weight is a 4-bit base: merged into a dense linear, never unmerged
    base: nn.Module

    def _hold(self, base: nn.Module) -> None:
        """Keep the whole 4-bit module, frozen: its library's product reads it (never fused)."""
        self.base = base.requires_grad_(False)

    def _adapter_parameter(self, tensor: Tensor, dtype: torch.dtype | None) -> nn.Parameter:
        """Adapters beside the 4-bit weight: float32 unless a dtype is given (QLoRA's masters)."""
        return nn.Parameter(tensor.to(device=self.base.weight.device, dtype=dtype or torch.float32))

    @property
    def weight(self) -> Tensor:
        """The dequantized base weight, for the dense formulas (merging; Hydra's folded adapter)."""
        return quantized.dequantized(self.base)

    @torch.no_grad()
    def prepare_merge(self) -> tuple[nn.Linear, MergeRecord, Tensor]:
        """A dense linear holding the dequantized base (written with the merged weight by the caller),
        its record (marked: no unmerge back to 4 bits) and W0 + delta rounded once from float64."""
        weight = self.weight
        a, b = self.adapter(torch.float64)
        merged = (weight.double() + b @ a).to(weight.dtype)
        empty = torch.empty(0, dtype=torch.long)
        record = MergeRecord(self.checkpoint_tensors(), b, a, empty, weight.new_empty(0), -1, quantized=True)
        return quantized.dense(self.base, weight), record, merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={quantized.describe(self.base)}"


class QLoRALinear(QuantizedAdapter, LoRALinear):
    """Drop-in replacement of a 4-bit linear with a LoRA adapter (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.adapter(self.lora_A.dtype)
        h = F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x
        update = F.linear(F.linear(h.to(a.dtype), a), b)
        return quantized.product(self.base, x) + update.to(x.dtype)


class QHydraLinear(QuantizedAdapter, HydraLinear):
    """Drop-in replacement of a 4-bit linear with Hydra's parallel and sequential adapters: the
    sequential one reads the 4-bit product itself (not `As W0`, which would dequantize the weight)."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.parallel_A.dtype
        h = quantized.product(self.base, x, bias=False)
        parallel = F.linear(F.linear(x.to(dtype), self.parallel_A), self.parallel_B * self.scaling_parallel)
        sequential = F.linear(
            F.linear(h.to(dtype), self.sequential_A), self.sequential_B * self.scaling_sequential
        )
        y = h + (parallel + sequential).to(h.dtype)
        return y if self.base.bias is None else y + self.base.bias.to(y.dtype)
