"""Triton kernels: PaCA's column gather/scatter and partial-column gradient GEMM, the fused LoRA
products, and the lean frozen path (RMSNorm, rotary embeddings, the gated activation, cross-entropy
over logits in place).

Importable as ``slimtune.triton_kernels``. Set ``TRITON_INTERPRET=1`` before import
to run them on CPU tensors (slow; for tests only).
"""

from .column_grad import column_grad
from .columns import gather_columns, scatter_columns
from .cross_entropy import cross_entropy_
from .lora import glu, glu_backward, glu_down, lora_input_grad, lora_linear, matmul_sum
from .rms_norm import rms_norm_backward, rms_norm_forward
from .rope import rope

__all__ = [
    "column_grad",
    "cross_entropy_",
    "gather_columns",
    "glu",
    "glu_backward",
    "glu_down",
    "lora_input_grad",
    "lora_linear",
    "matmul_sum",
    "rms_norm_backward",
    "rms_norm_forward",
    "rope",
    "scatter_columns",
]
