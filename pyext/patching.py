"""The public entry points that change a model: apply, merge, unmerge, save, load; and report.

Every check runs before the first change, so a refused call leaves the model exactly as it was.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from . import checkpoint, files, hf_model, quantized, sharding
from .architectures import architecture
from .checkpoint import CONFIG_FILE, FORMAT_VERSION, TENSORS_FILE
from .config import MethodConfig
from .methods.base import MERGE_RECORD
from .peft_compat import save_peft
from .registry import config_from_dict, for_config
from .state import (
    check_unpatched,
    clear,
    commit,
    duplicated_entries,
    patched_layers,
    plan,
    plan_checkpoint,
    require_patched,
)
from .transaction import Transaction


def apply(model: nn.Module, config: MethodConfig) -> nn.Module:
    """Swap the targeted modules of `model` in place for the method's layers and freeze the rest.

    Every check runs before the first change, so a refused call leaves the model exactly as it was.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(
            f"expected a slimtune config such as slimtune.PaCAConfig, got {type(config).__name__}"
        )
    check_unpatched(model)
    return hf_model.install(commit(model, config, plan(model, config)))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: exactly those the method trains."""
    require_patched(model)
    return [p for p in model.parameters() if p.requires_grad]


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Trained entries, all entries and their ratio, each entry counted once (PEFT's
    `print_trainable_parameters` numbers): an in-place method's trained tensors are entries of the
    dense weight, so `all` is the base model's count; adapters add their own parameters."""
    require_patched(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) - duplicated_entries(model)
    return {"trainable": trainable, "all": total, "percent": 100 * trainable / total}


def print_trainable_summary(model: nn.Module) -> None:
    """Print `trainable_summary` as PEFT prints its trainable parameters."""
    s = trainable_summary(model)
    counts = f"trainable params: {s['trainable']:,d} || all params: {s['all']:,d}"
    print(f"{counts} || trainable%: {s['percent']:.4f}")


def merge(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Replace every slimtune layer by a plain module holding the trained weights (same outputs).

    Parameters get back the `requires_grad` flags they had before `apply`. A layer on a 4-bit base
    becomes a dense linear in the dtype the base was quantized from; with `requantize=True` it is
    quantized again as its base was (with a warning: rounding changes the merged weights).
    """
    state = require_patched(model)
    sharding.refuse_sharded(model, "merge")
    layers = patched_layers(model)
    on_4bit = {name: layer.base for name, layer in layers.items() if getattr(layer, "quantized", False)}
    if requantize and not on_4bit:
        raise ValueError(
            f"merge(requantize=True): no layer of this {type(model).__name__} sits on a 4-bit base; "
            f"merge without requantize"
        )
    with Transaction(model) as transaction:
        for_config(state.config).glue.unpatch(model, layers, state.extra, transaction)
        if requantize:
            _requantize(model, on_4bit)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(state.requires_grad.get(name, True))
        clear(model)
    hf_model.uninstall(model, state)
    return model


def _requantize(model: nn.Module, bases: dict[str, nn.Module]) -> None:
    """Each merged dense linear named in `bases` quantized again as its 4-bit base was."""
    for name, base in bases.items():
        model.set_submodule(name, quantized.quantized_like(base, model.get_submodule(name)))
    warnings.warn(
        f"slimtune.merge(requantize=True): {len(bases)} merged linears quantized to 4 bits again; the "
        f"rounding changes their weights, so the model no longer computes exactly what was trained",
        stacklevel=3,
    )


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `slimtune.merge` of a LoRA or Hydra model: adapter layers back, base weights bit for bit.

    `merge` wrote W0 + delta into each base weight in place and kept, per layer, the adapter tensors and
    the few entries where rounding W' - delta does not give W0 back; this restores them. Refused (model
    untouched) if a merged weight was modified since.
    """
    record = getattr(model, MERGE_RECORD, None)
    if record is None:
        raise ValueError(
            f"{type(model).__name__} was not merged by slimtune.merge from a LoRA or Hydra model; "
            f"there is nothing to unmerge"
        )
    check_unpatched(model)
    config, records = record
    saved, restores = for_config(config).glue.unmerge_steps(model, config, records)
    adapters = plan(model, config, saved)  # modules trained in full kept their values through merge
    return hf_model.install(commit(model, config, adapters, before=restores))


def save(model: nn.Module, directory: str | Path, format: str = "slimtune") -> Path:
    """Write `slimtune_config.json` and `slimtune_model.safetensors` (trained tensors and indices).

    `format="peft"` writes a PEFT LoRA adapter directory instead (LoRA models only).
    """
    if format == "peft":
        return save_peft(model, directory)
    if format != "slimtune":
        raise ValueError(f"unknown checkpoint format {format!r}; use 'slimtune' or 'peft'")
    return checkpoint.write(model, directory)


def load(model: nn.Module, directory: str | Path, allow_other_class: bool = False) -> nn.Module:
    """Patch a fresh copy of the base model with a saved checkpoint (refused for another model).

    A checkpoint saved from another model class (a different family of the same sizes) is refused;
    `allow_other_class=True` loads it with a warning.
    """
    directory = Path(directory)
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    for path in (config_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a directory written by slimtune.save?")
    meta = files.read_json(config_path)
    if (
        not isinstance(meta, dict)
        or meta.get("format") != "slimtune"
        or meta.get("format_version") != FORMAT_VERSION
    ):
        raise ValueError(f"{config_path} is not a slimtune checkpoint of format version {FORMAT_VERSION}")
    missing = [key for key in ("config", "modules") if not isinstance(meta.get(key), dict)]
    if missing:
        raise ValueError(
            f"{config_path} lacks {missing} (or they are not JSON objects): a damaged checkpoint"
        )
    check_unpatched(model)
    saved, tensor_meta = files.read_tensors(tensors_path, files.checkpoint_limit(model))
    files.check_bound(config_path, meta, tensor_meta, tensors_path)
    config = config_from_dict(meta["config"])
    _check_shapes(model, meta["modules"], meta.get("base_model_class"))
    saved_class, this_class = meta.get("base_model_class"), type(model).__name__
    if saved_class is not None and saved_class != this_class:
        message = f"{config_path} was saved from a {saved_class}; this model is a {this_class}"
        if not allow_other_class:
            raise ValueError(
                f"{message}: load it onto the model it was trained from (or allow_other_class=True)"
            )
        warnings.warn(f"slimtune.load: {message}; loading anyway (allow_other_class=True)", stacklevel=2)
    restore = plan_checkpoint(model, config, saved, str(tensors_path))
    planned = {r.name for r in restore.replacements}
    if planned != set(meta["modules"]):
        extra = sorted(planned - set(meta["modules"]))[:5]
        raise ValueError(
            f"the checkpoint's target_modules select modules it has no tensors for ({extra}...): "
            f"the checkpoint belongs to another model"
        )
    return hf_model.install(commit(model, config, restore))


def _check_shapes(model: nn.Module, modules: dict[str, list[int]], base_class: str | None) -> None:
    where = f"(saved from a {base_class})" if base_class else ""
    for name, (out_features, in_features) in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"checkpoint module {name!r} does not exist in {type(model).__name__} {where}: "
                f"load it onto the base model it was trained from"
            ) from None
        shape = [getattr(module, "out_features", None), getattr(module, "in_features", None)]
        if shape != [out_features, in_features]:
            raise ValueError(
                f"checkpoint module {name!r} is {out_features}x{in_features} (out x in) but the model's is "
                f"{shape[0]}x{shape[1]} {where}: load it onto the base model it was trained from"
            )


def report(model: nn.Module) -> dict[str, Any]:
    """What slimtune did to `model`: method, layers by type, the architecture entry used, and which
    modules run fused and which fell back to the exact unfused path (with the reason)."""
    state = require_patched(model)
    layers: dict[str, int] = {}
    for layer in patched_layers(model).values():
        layers[type(layer).__name__] = layers.get(type(layer).__name__, 0) + 1
    out: dict[str, Any] = {
        "method": state.config.method,
        "config": state.config.to_dict(),
        "architecture": architecture(model).name,
        "layers": layers,
    }
    out.update(for_config(state.config).glue.describe(state.extra))
    return out
