"""4-bit quantized bases: which quantized linears slimtune trains on, and their dequantized weights.

bitsandbytes' `Linear4bit` (NF4 and FP4, with or without double quantization; what transformers'
`BitsAndBytesConfig(load_in_4bit=True)` produces) is recognised by its type, without importing
bitsandbytes where it is not installed. PaCA trains on it (`layers.qpaca`): the 4-bit weight stays
frozen and untouched, and its forward stays the library's own 4-bit product. Any other quantized
linear is refused by name (`targets.check_plain_linear`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_4bit(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit linear holding a quantized weight."""
    kind = type(module)
    return (
        kind.__name__ == "Linear4bit"
        and kind.__module__.startswith("bitsandbytes")
        and getattr(getattr(module, "weight", None), "quant_state", None) is not None
    )


def describe(module: nn.Module) -> str:
    """The quantization of a 4-bit linear in words: library, format, double quantization."""
    state = module.weight.quant_state
    double = ", double quantization" if getattr(state, "nested", False) else ""
    return f"bitsandbytes Linear4bit ({state.quant_type}{double})"


def dtype(module: nn.Module) -> torch.dtype:
    """The dtype the 4-bit weight was quantized from (what it dequantizes to)."""
    return module.weight.quant_state.dtype


def _repacked(module: nn.Module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def check(name: str, module: nn.Module) -> None:
    """Refuse a 4-bit weight that bitsandbytes repacked for its CPU inference kernel (what an eval-mode
    forward without gradients does on CPUs with AVX512-BF16): its layout is no longer the quantized one."""
    if _repacked(module):
        raise ValueError(
            f"module {name!r}: bitsandbytes repacked its 4-bit weight for CPU inference (an eval-mode "
            f"forward without gradients); load the model again and apply slimtune before evaluating it"
        )


def dequantized(module: nn.Module) -> Tensor:
    """The weight `module` computes with (out x in), in the dtype it was quantized from."""
    import bitsandbytes.functional as functional

    check(type(module).__name__, module)
    weight = module.weight
    return functional.dequantize_4bit(weight.data, weight.quant_state).reshape(
        module.out_features, module.in_features
    )


def dense(module: nn.Module, weight: Tensor) -> nn.Linear:
    """A frozen `nn.Linear` of `module`'s shape holding `weight` (a merged, dequantized weight) and
    the module's bias in the weight's dtype: what merging a layer on a 4-bit base gives."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
    return linear


def product(module: nn.Module, x: Tensor) -> Tensor:
    """`module`'s own 4-bit product of `x` (bitsandbytes' `matmul_4bit` in the module's compute dtype),
    as its forward computes it in training, without the repacking for its CPU inference kernel (which
    would change the numerics between training and evaluation, and the weight's layout)."""
    import bitsandbytes as bnb

    dtype = module.compute_dtype or x.dtype
    bias = None if module.bias is None else module.bias.to(dtype)
    out = bnb.matmul_4bit(x.to(dtype), module.weight, bias=bias, quant_state=module.weight.quant_state)
    return out.to(x.dtype)
