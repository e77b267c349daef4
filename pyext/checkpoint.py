"""slimtune's checkpoint files, and the checkpoint HF Trainer, TRL and accelerate write and resume from.

`write` saves a patched model as `slimtune_config.json` + `slimtune_model.safetensors` (the trained
tensors and indices; `slimtune.load` puts them onto a fresh base model).

`Trainer._save` (every `save_steps`, and `save_model`) calls the model's `save_pretrained(dir,
state_dict=..., is_main_process=...)`; `Trainer.train(resume_from_checkpoint=dir)` loads
`dir/model.safetensors` into the model with `load_state_dict(state, strict=False)`. A patched model
gets (`hf_model.install`, on the instance; its class stays HF's):

- `save_pretrained`: writes slimtune's checkpoint and `model.safetensors` with the trained parameters
  under their state-dict names and the digest of the checkpoint's identity (method config, base
  class, patched module shapes). Small: no frozen weight is written.
- a load-state-dict pre-hook: a state dict that carries a digest loads only into a model of the same
  identity (another config, seed or architecture is refused before any tensor is copied); the
  digest itself is removed before loading.
- `_keys_to_ignore_on_save`: every state-dict key that is not saved (the frozen weights), which is what
  Trainer's resume compares its missing keys with, so it does not warn about them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__, files, sharding
from .state import patch_state, patched_layers, require_patched, state_tensors

CONFIG_FILE = "slimtune_config.json"
TENSORS_FILE = "slimtune_model.safetensors"
RESUME_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: what Trainer resumes from
FORMAT_VERSION = 1
DIGEST_KEY = "slimtune_identity_sha256"  # a uint8 tensor in RESUME_FILE (32 bytes)


def identity(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint's tensors belong to: the base model's class, the method config (seed
    included) and the shape of every patched module."""
    state = require_patched(model)
    return {
        "base_model_class": sharding.model_class(model).__name__,
        "config": state.config.to_dict(),
        "modules": {name: [m.out_features, m.in_features] for name, m in patched_layers(model).items()},
    }


def write(model: nn.Module, directory: str | Path, resume_state: bool = False) -> Path:
    """`slimtune_config.json` and `slimtune_model.safetensors`: the trained tensors and indices, bound to
    the config beside them by a digest (with `resume_state`, also Trainer's `model.safetensors`).
    All or nothing: after a failure the files in `directory` are the previous checkpoint's.
    A model sharded by FSDP2 is saved by every rank together (its trained tensors are gathered)
    and written by rank 0: the files equal those of the same model on one process."""
    require_patched(model, " (nothing to save)")
    directory = Path(directory)
    tensors = {k: sharding.gathered(v) for k, v in state_tensors(model).items()}
    resume = trained_state(model) if resume_state else None
    if sharding.is_sharded(model) and torch.distributed.get_rank() != 0:
        return directory  # gathered with rank 0 above; rank 0 writes
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "slimtune", "format_version": FORMAT_VERSION, "slimtune_version": __version__,
            **identity(model)}  # fmt: skip
    bound = {"format": "pt", files.CONFIG_DIGEST: files.json_digest(meta)}  # ties the two files
    writers: dict[Path, Callable[[Path], object]] = {
        directory / TENSORS_FILE: partial(files.save_tensors, tensors, metadata=bound),
        directory / CONFIG_FILE: partial(files.write_text, text=json.dumps(meta, indent=2) + "\n"),
    }
    if resume is not None:
        writers[directory / RESUME_FILE] = partial(files.save_tensors, resume, metadata={"format": "pt"})
    files.write_together(writers)
    return directory


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The trained parameters under their state-dict names, and the identity digest."""
    trained = ((name, p) for name, p in model.named_parameters() if p.requires_grad)
    tensors = {name: sharding.gathered(p) for name, p in trained}
    tensors[DIGEST_KEY] = _digest_tensor(model)
    return tensors


def _digest_tensor(model: nn.Module) -> Tensor:
    return torch.tensor(list(bytes.fromhex(files.json_digest(identity(model)))), dtype=torch.uint8)


class SavePretrained:
    """`save_pretrained` of a patched model: slimtune's checkpoint plus `model.safetensors` for
    Trainer's resume. `state_dict` (what Trainer passes from a wrapped or sharded model) is not used:
    the trained tensors are read from the model itself."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model  # a plain reference: copy.deepcopy of the model gives the copy its own

    def __call__(
        self,
        save_directory: str | Path,
        state_dict: dict | None = None,
        is_main_process: bool = True,
        **_: Any,
    ) -> None:
        if not is_main_process:
            return
        write(self._model, save_directory, resume_state=True)


def check_identity(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook of a patched model: refuse a slimtune state dict of another identity."""
    saved = state_dict.pop(prefix + DIGEST_KEY, None)
    if saved is None or patch_state(module) is None:
        return
    if not torch.equal(saved.to("cpu", torch.uint8).flatten(), _digest_tensor(module)):
        raise ValueError(
            f"this state dict was saved from a model patched with another slimtune config, seed or base "
            f"architecture than this {type(module).__name__} ({patch_state(module).config.method}): its "
            f"trained tensors would load into other entries. Patch the base model with the config in the "
            f"checkpoint's {CONFIG_FILE}, or load it with slimtune.load(base_model, checkpoint_dir)"
        )
