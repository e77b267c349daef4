"""Triton kernels for PaCA: column gather/scatter and the partial-column gradient GEMM.

Importable as ``slimtune.triton_kernels``. Set ``TRITON_INTERPRET=1`` before import
to run them on CPU tensors (slow; for tests only).
"""

from .column_grad import column_grad
from .columns import gather_columns, scatter_columns
from .lora import glu_backward, glu_down, lora_input_grad, lora_linear, matmul_sum

__all__ = [
    "column_grad",
    "gather_columns",
    "glu_backward",
    "glu_down",
    "lora_input_grad",
    "lora_linear",
    "matmul_sum",
    "scatter_columns",
]
