"""Which modules of a model a method targets: "all-linear", a list of name suffixes, or a regex."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

from . import quantized
from .architectures import architecture, block_stacks, is_conv1d
from .config import TargetModules


def describe_type(obj: object) -> str:
    """The qualified class name of `obj` (a module or a tensor), for messages."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def match_targets(model: nn.Module, target_modules: TargetModules) -> list[tuple[str, nn.Module]]:
    """Names and modules selected by `target_modules`, in model order; raises if nothing matches."""
    model_name = type(model).__name__
    if target_modules == "all-linear":
        stacks = block_stacks(model)
        if not stacks:
            raise ValueError(
                f"target_modules='all-linear' found no transformer block list (an nn.ModuleList of "
                f"same-class blocks) in {model_name}; pass target_modules as a list of module-name "
                f"suffixes such as ['q_proj', 'v_proj'] or a regex"
            )
        output_embeddings = _output_embeddings(model)
        skip = architecture(model).not_all_linear
        found = [
            (f"{prefix}.{name}", module)
            for prefix, stack in stacks
            for name, module in stack.named_modules()
            if (isinstance(module, nn.Linear) or is_conv1d(module))
            and module is not output_embeddings
            and not (skip and re.fullmatch(skip, name.rsplit(".", 1)[-1]))
        ]
        if not found:
            raise ValueError(
                f"target_modules='all-linear' found no linear layer inside the blocks of {model_name}"
            )
        return found

    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {err}") from err
        found = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
        what = f"regex {target_modules!r} (matched with re.fullmatch against full module names)"
    else:
        suffixes = tuple(target_modules)
        found = [(n, m) for n, m in model.named_modules() if n and any(_has_suffix(n, s) for s in suffixes)]
        unmatched = [s for s in suffixes if not any(_has_suffix(n, s) for n, _ in found)]
        if unmatched and found:
            raise ValueError(
                f"target_modules entries {unmatched} match no module of {model_name}; "
                f"linear names there include {_linear_name_examples(model)}"
            )
        what = f"suffixes {list(suffixes)}"
    if not found:
        raise ValueError(
            f"target_modules {what} match no module of {model_name}; "
            f"linear names there include {_linear_name_examples(model)}"
        )
    return found


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _linear_name_examples(model: nn.Module, limit: int = 8) -> list[str]:
    leaf_names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in leaf_names:
                leaf_names.append(leaf)
    return leaf_names[:limit]


_META_ALLOWED: ContextVar[bool] = ContextVar("slimtune_meta_allowed", default=False)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Let `apply` patch a model whose weights are on the meta device (accounting, `slimtune profile`).

    Outside this block a meta weight is refused: trained entries copied from it would hold no values.
    """
    token = _META_ALLOWED.set(True)
    try:
        yield
    finally:
        _META_ALLOWED.reset(token)


def check_base_linear(name: str, module: nn.Module, takes_4bit: bool) -> nn.Module:
    """A plain linear (`check_plain_linear`), or, for a method that trains on 4-bit bases
    (`takes_4bit`), a 4-bit one in its quantized layout (`quantized.check`)."""
    if takes_4bit and quantized.is_4bit(module):
        quantized.check(name, module)
        return module
    return check_plain_linear(name, module)


def check_plain_linear(name: str, module: nn.Module) -> nn.Linear:
    """Refuse anything but a floating-point `nn.Linear` with a message naming the module and the fix."""
    if is_conv1d(module):
        raise ValueError(
            f"module {name!r} is a transformers Conv1D (GPT-2 style, weight stored as in x out), which "
            f"slimtune does not patch; convert the model's Conv1D layers to nn.Linear first or target "
            f"other modules"
        )
    if quantized.is_4bit(module):
        raise ValueError(
            f"module {name!r} is a {quantized.describe(module)}: PaCA, LoRA and Hydra train on 4-bit "
            f"bases (QPaCA, QLoRA, QHydra); this method needs dense weights (load the model unquantized)"
        )
    if type(module) is not nn.Linear:
        if isinstance(module, nn.Linear):
            reason = "a subclass of nn.Linear (quantized or otherwise customised layers are not supported)"
        else:
            reason = "not an nn.Linear"
        raise ValueError(
            f"module {name!r} of type {describe_type(module)} is {reason}; exclude it from target_modules "
            f"(or dequantize the model) and apply again"
        )
    weight = module.weight
    if not weight.is_floating_point():
        raise ValueError(
            f"module {name!r} has a {weight.dtype} weight (quantized?); slimtune trains float32, "
            f"float16 or bfloat16 weights: dequantize the model first"
        )
    if type(weight.data) is not torch.Tensor:
        raise ValueError(
            f"module {name!r} holds its weight as a {describe_type(weight.data)} (a tensor subclass: "
            f"quantized or distributed?); slimtune patches plain float weights: dequantize the model, or "
            f"apply slimtune before sharding it"
        )
    if weight.device.type == "meta" and not _META_ALLOWED.get():
        raise ValueError(
            f"module {name!r} has its weight on the meta device; load real weights before applying "
            f"(or, to account memory and FLOPs only, apply inside slimtune.on_meta())"
        )
    if hasattr(weight, "ds_id") and weight.shape != (module.out_features, module.in_features):
        raise ValueError(
            f"module {name!r} has its weight partitioned by DeepSpeed ZeRO-3 (the model was built inside "
            f"deepspeed.zero.Init, as transformers does once ZeRO-3 is configured); slimtune patches whole "
            f"weights: build the model and apply slimtune before configuring ZeRO-3 (before creating "
            f"accelerate's Accelerator or an HfDeepSpeedConfig), then let DeepSpeed partition the model"
        )
    return module


def check_untied(model: nn.Module, names: list[str], method: str) -> None:
    """Refuse training weights in place when another module shares one of them (tied embeddings):
    the trained entries would reach one of its users and leave the other reading stale values."""
    users: dict[int, list[str]] = {}
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(parameter), []).append(parameter_name)
    for name in names:
        sharing = users[id(model.get_submodule(name).weight)]
        if len(sharing) > 1:
            others = sorted(u for u in sharing if not u.startswith(name + "."))
            raise ValueError(
                f"module {name!r} shares its weight with {others} (tied embeddings): {method} trains weight "
                f"entries in place and cannot keep both users in sync; exclude {name!r} from "
                f"target_modules, or untie the weights first (config.tie_word_embeddings=False)"
            )
