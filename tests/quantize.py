"""4-bit bases for the QPaCA/QLoRA tests: a linear or a whole model quantized in place in each format
slimtune trains on, and the dense twin holding the dequantized weights (the tests' reference)."""

from __future__ import annotations

import copy

import slimtune
from slimtune.apps.quantize import linear_4bit
from torch import nn

# format id -> (library, bitsandbytes quant_type, double quantization)
FORMATS = {
    "bnb-nf4": ("bnb", "nf4", False),
    "bnb-nf4-double": ("bnb", "nf4", True),
    "bnb-fp4": ("bnb", "fp4", False),
    "torchao-nf4": ("torchao", "nf4", True),
}


def _scaler_block(blocks: int) -> int:
    """The largest divisor of `blocks` up to torchao's default 256 that leaves an even number of scaler
    groups (FSDP2 splits each of NF4's inner tensors in two across two processes)."""
    return max(
        size for size in range(1, min(blocks, 256) + 1) if blocks % size == 0 and blocks // size % 2 == 0
    )


def _torchao(linear: nn.Linear) -> nn.Module:
    """`linear` with its weight as a torchao NF4Tensor (as torchtune's FrozenNF4Linear holds it);
    blocks of 64 where the weight divides into them, else 16 (tiny shapes)."""
    from torchao.quantization import to_nf4

    weight = linear.weight.detach()
    block = 64 if weight.numel() % 64 == 0 else 16
    q = copy.copy(linear)
    q._parameters = dict(linear._parameters)
    nf4 = to_nf4(weight, block, _scaler_block(weight.numel() // block))
    q.weight = nn.Parameter(nf4, requires_grad=False)
    return q


def quantize_linear(linear: nn.Linear, fmt: str = "bnb-nf4") -> nn.Module:
    """`linear` as a 4-bit linear of format `fmt` (a key of FORMATS) computing in its dtype."""
    library, quant_type, double = FORMATS[fmt]
    return _torchao(linear) if library == "torchao" else linear_4bit(linear, quant_type, double)


def quantize(model: nn.Module, fmt: str = "bnb-nf4") -> nn.Module:
    """Every linear of the blocks as a 4-bit linear of format `fmt` (the LM head stays dense)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and ".layers." in name:
            model.set_submodule(name, quantize_linear(module, fmt))
    return model


def _dense(module: nn.Module) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight = nn.Parameter(slimtune.quantized.dequantized(module).clone())
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().clone())
    return linear.to(linear.weight.dtype)


def dense_twin(quantized: nn.Module) -> nn.Module:
    """The same model with every 4-bit linear replaced by a dense one holding its dequantized weight
    (the 4-bit modules themselves are never copied: a deepcopy of a torchao NF4Tensor re-quantizes it
    with the default block sizes)."""
    dense = {id(m): _dense(m) for m in quantized.modules() if slimtune.quantized.is_4bit(m)}
    return copy.deepcopy(quantized, memo=dict(dense))
