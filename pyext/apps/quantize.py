"""4-bit bases for `slimtune profile`: a model's linears as bitsandbytes `Linear4bit`, as transformers'
`BitsAndBytesConfig(load_in_4bit=True)` loads them (every linear but the LM head), on any device.

On a real device bitsandbytes quantizes the weight as the module moves there. On the meta device
nothing can be quantized: the packed weight and its quantization state (absmax, code, and with double
quantization the quantized absmax, its offset and second state) are made empty at the sizes and dtypes
bitsandbytes gives them, so the accounting counts the bytes a loaded model holds, and bitsandbytes'
own fake kernels run its 4-bit product on meta.
"""

from __future__ import annotations

import torch
from torch import nn

# --quant choice -> (bitsandbytes quant_type, double quantization); "nf4" is QLoRA's (and the PaCA
# paper's QPaCA) setting
FORMATS = {"nf4": ("nf4", True), "nf4-single": ("nf4", False), "fp4": ("fp4", False)}
BLOCK = 64  # bitsandbytes' default 4-bit block; double quantization groups 256 absmax values
NESTED_BLOCK = 256


def _blocks(count: int, size: int) -> int:
    return -(-count // size)


def _meta_state(shape: torch.Size, quant_type: str, double: bool, dtype: torch.dtype):
    """A bitsandbytes QuantState of empty meta tensors, sized as `quantize_4bit` makes them."""
    from bitsandbytes.functional import QuantState

    meta = torch.device("meta")
    blocks = _blocks(shape.numel(), BLOCK)
    code = torch.empty(16, dtype=torch.float32, device=meta)
    if not double:
        absmax = torch.empty(blocks, dtype=torch.float32, device=meta)
        return QuantState(absmax, shape, code, BLOCK, quant_type, dtype)
    nested = QuantState(
        torch.empty(_blocks(blocks, NESTED_BLOCK), dtype=torch.float32, device=meta),
        code=torch.empty(256, dtype=torch.float32, device=meta),
        blocksize=NESTED_BLOCK,
        dtype=torch.float32,
    )
    absmax = torch.empty(blocks, dtype=torch.uint8, device=meta)
    # the offset is a real 0-dim CPU tensor (4 bytes, as on a card): bitsandbytes' state_dict reads it
    # with .item(), and a CPU scalar mixes with meta tensors in its dequantization
    offset = torch.zeros((), dtype=torch.float32)
    return QuantState(absmax, shape, code, BLOCK, quant_type, dtype, offset=offset, state2=nested)


def linear_4bit(linear: nn.Linear, quant_type: str = "nf4", double: bool = True) -> nn.Module:
    """`linear` as a frozen bitsandbytes `Linear4bit` computing in its weight's dtype, on its device."""
    import bitsandbytes as bnb

    weight, dtype = linear.weight.detach(), linear.weight.dtype
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=double,
        quant_type=quant_type,
        device="meta",
    )
    if weight.device.type == "meta":
        packed = torch.empty(_blocks(weight.numel(), 2), 1, dtype=torch.uint8, device="meta")
        state = _meta_state(weight.shape, quant_type, double, dtype)
        module.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, quant_type=quant_type, bnb_quantized=True
        )
    else:
        module.weight = bnb.nn.Params4bit(
            weight.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double
        )
    module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
    return module if weight.device.type == "meta" else module.to(weight.device)


def quantize(model: nn.Module, fmt: str = "nf4") -> nn.Module:
    """Every `nn.Linear` of `model` but its output embeddings (the LM head) as a 4-bit linear of
    `fmt` (a key of FORMATS), in place; returns `model`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown 4-bit format {fmt!r}; choose from {', '.join(FORMATS)}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head:
            model.set_submodule(name, linear_4bit(module, *FORMATS[fmt]))
    return model
