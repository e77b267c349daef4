"""Save and load only what a method trained: a JSON config plus one safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import MethodConfig
from .methods import method_for
from .model import _check_model, commit, patched_layers, require_patched, state_tensors

CONFIG_FILE = "slimtune_config.json"
TENSORS_FILE = "slimtune_model.safetensors"
FORMAT_VERSION = 1


def save(model: nn.Module, directory: str | Path, format: str = "slimtune") -> Path:
    """Write `slimtune_config.json` and `slimtune_model.safetensors` (trained tensors and indices).

    `format="peft"` writes a PEFT LoRA adapter directory instead (LoRA models only).
    """
    if format == "peft":
        from .peft_compat import save_peft

        return save_peft(model, directory)
    if format != "slimtune":
        raise ValueError(f"unknown checkpoint format {format!r}; use 'slimtune' or 'peft'")
    state = require_patched(model, " (nothing to save)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_tensors(model).items()}
    shapes = {name: _shape(layer) for name, layer in patched_layers(model).items()}
    meta = {
        "format": "slimtune",
        "format_version": FORMAT_VERSION,
        "slimtune_version": __version__,
        "base_model_class": type(model).__name__,
        "config": state.config.to_dict(),
        "modules": shapes,
    }
    save_file(tensors, directory / TENSORS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Patch a fresh copy of the base model with a saved checkpoint (refused for another model)."""
    directory = Path(directory)
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    for path in (config_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a directory written by slimtune.save?")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != "slimtune" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} is not a slimtune checkpoint of format version {FORMAT_VERSION}")
    _check_model(model)
    config = MethodConfig.from_dict(meta["config"])
    saved = load_file(tensors_path)
    _check_shapes(model, meta["modules"], meta.get("base_model_class"))
    plan = method_for(config).plan(model, config, saved)
    planned = {r.name for r in plan.replacements}
    if planned != set(meta["modules"]):
        extra = sorted(planned - set(meta["modules"]))[:5]
        raise ValueError(
            f"the checkpoint's target_modules select modules it has no tensors for ({extra}...): "
            f"the checkpoint belongs to another model"
        )
    return commit(model, config, plan)


def _shape(layer: nn.Module) -> list[int]:
    return [layer.out_features, layer.in_features]


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
