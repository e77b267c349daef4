"""4-bit quantized bases: which quantized linears slimtune trains on, and their dequantized weights.

Two formats, each recognised without importing its library where it is not installed:
- bitsandbytes' `Linear4bit` (NF4 and FP4, with or without double quantization; what transformers'
  `BitsAndBytesConfig(load_in_4bit=True)` produces);
- an `nn.Linear` whose weight is a torchao `NF4Tensor` (`torchao.quantization.to_nf4`; torchtune's
  `FrozenNF4Linear` is one).
PaCA, LoRA and Hydra train on them (`layers.qpaca`, `layers.qlora`): the 4-bit weight stays frozen and
untouched, and the forward stays the library's own 4-bit product. Any other quantized linear or
tensor-subclass weight is refused by name (`targets.check_plain_linear`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Bitsandbytes:
    """bitsandbytes `Linear4bit`: the weight is a `Params4bit` carrying its `quant_state`."""

    shards_under_fsdp2 = False  # its quantization state lives beside the parameter, where FSDP2 cannot see

    @staticmethod
    def matches(module: nn.Module) -> bool:
        kind = type(module)
        return (
            kind.__name__ == "Linear4bit"
            and kind.__module__.startswith("bitsandbytes")
            and getattr(getattr(module, "weight", None), "quant_state", None) is not None
        )

    @staticmethod
    def describe(module: nn.Module) -> str:
        state = module.weight.quant_state
        double = ", double quantization" if getattr(state, "nested", False) else ""
        return f"bitsandbytes Linear4bit ({state.quant_type}{double})"

    @staticmethod
    def dtype(module: nn.Module) -> torch.dtype:
        return module.weight.quant_state.dtype

    @staticmethod
    def check(name: str, module: nn.Module) -> None:
        """Refuse a weight bitsandbytes repacked for its CPU inference kernel (what an eval-mode forward
        without gradients does on CPUs with AVX512-BF16): its layout is no longer the quantized one."""
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                f"module {name!r}: bitsandbytes repacked its 4-bit weight for CPU inference (an eval-mode "
                f"forward without gradients); load the model again and apply slimtune before evaluating it"
            )

    @staticmethod
    def held(module: nn.Module) -> list[Tensor]:
        state = module.weight.quant_state
        tensors = [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "nested", False):
            tensors += [state.state2.absmax, state.state2.code]
        return [t for t in tensors if isinstance(t, Tensor)]

    @staticmethod
    def dequantized(module: nn.Module) -> Tensor:
        import bitsandbytes.functional as functional

        weight = module.weight
        return functional.dequantize_4bit(weight.data, weight.quant_state).reshape(
            module.out_features, module.in_features
        )

    @staticmethod
    def like(module: nn.Module, linear: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        state = module.weight.quant_state
        double = bool(getattr(state, "nested", False))
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=module.compute_dtype, compress_statistics=double, quant_type=state.quant_type,
            device="meta",
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(
            linear.weight.detach().to(state.dtype).clone(), requires_grad=False, blocksize=state.blocksize,
            compress_statistics=double, quant_type=state.quant_type,
        )  # fmt: skip
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q.to(module.weight.device)  # bitsandbytes quantizes on the move

    @staticmethod
    def product(module: nn.Module, x: Tensor, bias: bool) -> Tensor:
        """bitsandbytes' `matmul_4bit` in the module's compute dtype, as its forward computes it in
        training, without the repacking for its CPU inference kernel (which would change the numerics
        between training and evaluation, and the weight's layout)."""
        import bitsandbytes as bnb

        dtype = module.compute_dtype or x.dtype
        added = module.bias.to(dtype) if bias and module.bias is not None else None
        out = bnb.matmul_4bit(x.to(dtype), module.weight, bias=added, quant_state=module.weight.quant_state)
        return out.to(x.dtype)


class _TorchaoNF4:
    """An `nn.Linear` whose weight is a torchao `NF4Tensor` (dtype: the dtype it was quantized from)."""

    shards_under_fsdp2 = True  # NF4Tensor splits and gathers its inner tensors for FSDP2 (torchtune's QLoRA)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        kind = type(weight.data) if isinstance(weight, nn.Parameter) else type(weight)
        return (
            isinstance(module, nn.Linear)
            and kind.__name__ == "NF4Tensor"
            and kind.__module__.startswith("torchao")
        )

    @staticmethod
    def describe(module: nn.Module) -> str:
        weight = module.weight
        return f"torchao NF4 linear (block {weight.block_size}, scaler block {weight.scaler_block_size})"

    @staticmethod
    def dtype(module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    @staticmethod
    def check(name: str, module: nn.Module) -> None:
        """Nothing to refuse: torchao keeps the quantized layout."""

    @staticmethod
    def held(module: nn.Module) -> list[Tensor]:
        return []  # the NF4Tensor parameter holds its scalers and codes itself

    @staticmethod
    def dequantized(module: nn.Module) -> Tensor:
        return module.weight.get_original_weight()

    @staticmethod
    def like(module: nn.Module, linear: nn.Linear) -> nn.Module:
        from torchao.quantization import to_nf4

        weight = module.weight
        q = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        nf4 = to_nf4(linear.weight.detach().to(weight.dtype), weight.block_size, weight.scaler_block_size)
        q.weight = nn.Parameter(nf4, requires_grad=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    @staticmethod
    def product(module: nn.Module, x: Tensor, bias: bool) -> Tensor:
        """torchao's `linear_nf4` (the weight dequantized to x's dtype; only the 4-bit weight saved for
        backward), then the bias, as torchtune's `FrozenNF4Linear` computes it."""
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        out = linear_nf4(x, module.weight)
        return out if not bias or module.bias is None else out + module.bias.to(out.dtype)


_FORMATS = (_Bitsandbytes, _TorchaoNF4)


def _format(module: nn.Module) -> type:
    for candidate in _FORMATS:
        if candidate.matches(module):
            return candidate
    raise ValueError(f"{type(module).__name__} is not a 4-bit linear slimtune knows")


def is_4bit(module: nn.Module) -> bool:
    """Whether `module` is a 4-bit linear of a format slimtune trains on."""
    return any(candidate.matches(module) for candidate in _FORMATS)


def describe(module: nn.Module) -> str:
    """The quantization of a 4-bit linear in words: library, format, its settings."""
    return _format(module).describe(module)


def shards_under_fsdp2(module: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) shards and gathers this 4-bit weight exactly (torchao's NF4 does;
    bitsandbytes' keeps its quantization state outside the parameter)."""
    return _format(module).shards_under_fsdp2


def dtype(module: nn.Module) -> torch.dtype:
    """The dtype the 4-bit weight was quantized from (what it dequantizes to)."""
    return _format(module).dtype(module)


def check(name: str, module: nn.Module) -> None:
    """Refuse a 4-bit weight whose layout is no longer the quantized one, naming `name` and the fix."""
    _format(module).check(name, module)


def held_tensors(model: nn.Module) -> list[Tensor]:
    """The tensors the 4-bit bases of `model` hold beside their parameters and buffers (bitsandbytes'
    quantization state: absmax, code, nested state), which a memory account must count too."""
    return [t for m in model.modules() if is_4bit(m) for t in _format(m).held(m)]


def dequantized(module: nn.Module) -> Tensor:
    """The weight `module` computes with (out x in), in the dtype it was quantized from."""
    check(type(module).__name__, module)
    return _format(module).dequantized(module)


def product(module: nn.Module, x: Tensor, bias: bool = True) -> Tensor:
    """`module`'s own 4-bit product of `x` (with its bias unless `bias` is False), as its forward
    computes it in training."""
    return _format(module).product(module, x, bias)


def quantized_like(module: nn.Module, linear: nn.Linear) -> nn.Module:
    """`linear` (a merged weight) quantized to 4 bits as `module` is: same library, format, block sizes,
    double quantization and compute dtype, on `module`'s device. Rounding changes the weight."""
    return _format(module).like(module, linear)


def dense(module: nn.Module, weight: Tensor) -> nn.Linear:
    """A frozen `nn.Linear` of `module`'s shape holding `weight` (a merged, dequantized weight) and
    the module's bias in the weight's dtype: what merging a layer on a 4-bit base gives."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
    return linear
