"""Modules trained in full beside a method (PEFT's `modules_to_save`): a classification head, an
embedding that must learn new tokens.

Named by `modules_to_save` in every method's config (module-name suffixes, as PEFT matches them).
Their parameters train in place (PEFT keeps a trained copy beside the original instead; slimtune
trains in place, like its partial methods), are saved and loaded by `slimtune.save/load` under
`modules_to_save.<module>.<parameter>`, and exported to PEFT as PEFT saves them.
"""

from __future__ import annotations

from torch import Tensor, nn

PREFIX = "modules_to_save."


def resolve(model: nn.Module, suffixes: tuple[str, ...], replaced: list[str]) -> list[str]:
    """The full names of the modules `suffixes` select, checked: each suffix matches, no selected
    module is (or holds, or sits inside) a module the method replaces, each has float parameters."""
    names = []
    for suffix in suffixes:
        found = [n for n, _ in model.named_modules() if n and (n == suffix or n.endswith("." + suffix))]
        if not found:
            raise ValueError(
                f"modules_to_save entry {suffix!r} matches no module of {type(model).__name__}; "
                f"name modules by their name or a suffix of it, e.g. 'lm_head' or 'score'"
            )
        names.extend(n for n in found if n not in names)
    for name in names:
        clash = [r for r in replaced if r == name or r.startswith(name + ".") or name.startswith(r + ".")]
        if clash:
            raise ValueError(
                f"modules_to_save module {name!r} overlaps the method's target {clash[0]!r}: a module is "
                f"either adapted or trained in full; remove it from target_modules or from modules_to_save"
            )
        parameters = list(model.get_submodule(name).named_parameters())
        if not parameters or not all(p.is_floating_point() for _, p in parameters):
            raise ValueError(f"modules_to_save module {name!r} has no float parameters to train")
    return names


def parameters(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """`modules_to_save.<module>.<parameter>` -> parameter, for the modules `names`."""
    return {
        f"{PREFIX}{name}.{key}": parameter
        for name in names
        for key, parameter in model.get_submodule(name).named_parameters()
    }


def saved_values(model: nn.Module, names: list[str], saved: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, checkpoint value) for every parameter of the modules `names`, checked."""
    pairs = []
    for key, parameter in parameters(model, names).items():
        value = saved.get(key)
        if value is None:
            raise ValueError(f"the checkpoint has no tensor {key!r} (modules_to_save)")
        if tuple(value.shape) != tuple(parameter.shape) or not value.is_floating_point():
            raise ValueError(
                f"the checkpoint's {key!r} is {value.dtype} {tuple(value.shape)} but the parameter is "
                f"{tuple(parameter.shape)} floats: the checkpoint belongs to another model"
            )
        pairs.append((parameter, value))
    return pairs
