"""What a patched model answers differently from its transformers class, set on the instance by every
entry point that patches (apply, load, unmerge, load_peft, corda.apply) and taken back by merge:

- `save_pretrained` (what Trainer, TRL and accelerate call to checkpoint): slimtune's checkpoint plus
  the file Trainer resumes from (`checkpoint.SavePretrained`);
- a load-state-dict pre-hook refusing a slimtune state dict of another identity
  (`checkpoint.check_identity`), and `_keys_to_ignore_on_save` naming the frozen keys such a state
  dict leaves out;
- `num_parameters`: each weight entry counted once (an in-place method's trained tensors are entries
  of the dense weight, not parameters beside it); adapters count, as PEFT counts them;
- for an in-place method, a forward pre-hook refusing sharding engines it cannot train under yet
  (`sharding`).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from . import sharding
from .checkpoint import SavePretrained, check_identity
from .state import PatchState, duplicated_entries, require_patched

_OVERRIDES = ("save_pretrained", "_keys_to_ignore_on_save", "num_parameters")


class NumParameters:
    """`num_parameters` of a patched model: the class's count less the duplicated entries."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __call__(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        model = self._model
        count = type(model).num_parameters(
            model, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings
        )
        return count if only_trainable else count - duplicated_entries(model)


def _loaded_keys(model: nn.Module) -> Iterator[str]:
    """The keys `load_state_dict` fills: every parameter and persistent buffer, a tied one under each
    name. (Not `state_dict()`'s keys: a bitsandbytes 4-bit linear adds its quantization state there,
    which Trainer's check of the missing keys on resume does not see.)"""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        yield from (dot + name for name, p in module._parameters.items() if p is not None)
        skip = module._non_persistent_buffers_set
        yield from (dot + name for name, b in module._buffers.items() if b is not None and name not in skip)


def install(model: nn.Module) -> nn.Module:
    """Set the overrides on a freshly patched model (see the module docstring)."""
    state = require_patched(model)
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = SavePretrained(model)
    if callable(getattr(model, "num_parameters", None)):
        model.num_parameters = NumParameters(model)
    if hasattr(model, "_keys_to_ignore_on_save"):  # a transformers PreTrainedModel
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        model._keys_to_ignore_on_save = [key for key in _loaded_keys(model) if key not in trained]
    state.load_hook = model.register_load_state_dict_pre_hook(check_identity)
    sharding.install(model, state)
    return model


def uninstall(model: nn.Module, state: PatchState) -> None:
    """The class's own behaviour again (after `merge`)."""
    for attribute in _OVERRIDES:
        model.__dict__.pop(attribute, None)
    if state.load_hook is not None:
        state.load_hook.remove()
        state.load_hook = None
    sharding.uninstall(state)
