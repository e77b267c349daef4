"""PEFT interop: load a PEFT LoRA adapter directory into slimtune layers, and write one PEFT loads.

A PEFT LoRA directory is `adapter_config.json` plus `adapter_model.safetensors` with tensors
`base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r), and, for
`modules_to_save`, `base_model.model.<module>.<parameter>`; PEFT's scaling is lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA), the same product as slimtune's LoRALinear.

Every field of PEFT's LoraConfig is accounted for: the ones below that slimtune reads or that do not
change the loaded model (`READ`, `INERT`) are taken; every other field (DoRA, bias, rank/alpha
patterns, quantisation-aware and data-driven initialisations, ...) must be off, else the adapter
is refused naming it, so no PEFT option loads to outputs other than PEFT's. Fields a future PEFT
adds are refused the same way until they are classified here.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import files, full_modules, hf_model
from .config import LoRAConfig
from .state import check_unpatched, commit, patch_state, patched_layers, plan_checkpoint, require_patched

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KINDS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}

# Fields slimtune reads, with PEFT's types (a truthy string is not a bool).
READ: dict[str, tuple[type, ...]] = {
    "peft_type": (str,),
    "r": (int,),
    "lora_alpha": (int, float),
    "lora_dropout": (int, float, type(None)),
    "use_rslora": (bool,),
    "init_lora_weights": (bool, str, type(None)),
    "modules_to_save": (list, type(None)),
}
# Fields that do not change the model loaded from the saved tensors: metadata, how PEFT chose the
# modules (the tensors name them), run-time settings, sub-options of features refused when on.
INERT = frozenset(
    {
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "target_modules",
        "exclude_modules",
        "layers_pattern",
        "megatron_core",
        "runtime_config",
        "qalora_group_size",
        "ensure_weight_tying",
    }
)
# Initialisations that leave the base weights as they are (PEFT's orthogonal_init and mica_init
# write only lora_A/lora_B): the saved tensors are an adapter on the plain base. MiCA also keeps
# lora_B frozen while training (PEFT's MiCALinearVariant), and so does load_peft.
PLAIN_INITS = (True, False, "gaussian", None, "orthogonal", "mica")
FROZEN_B_INITS = ("mica",)


def _is_off(value: Any) -> bool:
    return value in (None, False, "none", {}, [])


def _meaning(peft: dict[str, Any]) -> dict[str, Any]:
    """The fields of an adapter config that decide the model it loads to (an edited path does not)."""
    return {key: value for key, value in sorted(peft.items()) if key not in INERT}


def _peft_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    for needed in (path, directory / WEIGHTS_FILE):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} not found: is {directory} a PEFT adapter directory (save_pretrained)?"
            )
    config = files.read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a PEFT adapter config object")
    for key, kinds in READ.items():
        value = config.get(key)
        if key in config and (
            not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        ):
            raise TypeError(f"{path}: {key}={value!r} is not a {' or '.join(k.__name__ for k in kinds)}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{path} describes a {config.get('peft_type')!r} adapter; slimtune.load_peft loads "
            f"PEFT LoRA adapters only"
        )
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        # PiSSA, OLoRA, CorDA, LoftQ, EVA, LoRA-GA...: PEFT rewrites the base weights (or builds them
        # from data) when it creates such an adapter, so these tensors are not an adapter on the plain
        # base model.
        raise ValueError(
            f"{path} sets init_lora_weights={init!r}: PEFT changes the base weights for that initialisation, "
            f"so the adapter does not apply to this base model as saved; load it with peft (and merge), "
            f"or convert it with PEFT's own tools to a plain LoRA first"
        )
    for key, value in config.items():
        if key not in READ and key not in INERT and not _is_off(value):
            raise ValueError(
                f"{path} sets {key}={value!r}, which slimtune's LoRA does not implement; "
                f"load it with peft, or retrain without {key}"
            )
    return config


def load_peft(model: nn.Module, directory: str | Path) -> nn.Module:
    """Patch `model` with the PEFT LoRA adapter saved in `directory`: same outputs as PEFT's model.

    Refused (model untouched) for another PEFT type, options slimtune lacks, or an adapter whose modules
    or shapes are not this model's.
    """
    directory = Path(directory)
    peft = _peft_config(directory)
    tensors, metadata = files.read_tensors(directory / WEIGHTS_FILE, files.checkpoint_limit(model))
    files.check_bound(directory / CONFIG_FILE, _meaning(peft), metadata, directory / WEIGHTS_FILE)
    saved, adapted = {}, set()
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{directory / WEIGHTS_FILE} holds {key!r}, which is not under {PREFIX!r}")
        module, _, kind = key.removeprefix(PREFIX).partition(".lora_")
        if f"lora_{kind}" in KINDS:
            saved[f"{module}.{KINDS[f'lora_{kind}']}"] = tensor
            adapted.add(module)
        else:  # a parameter of a module trained in full; the plan refuses it if none is listed
            saved[full_modules.PREFIX + key.removeprefix(PREFIX)] = tensor
    r, alpha = peft.get("r"), peft.get("lora_alpha")
    if r is None or alpha is None or not adapted:
        raise ValueError(
            f"{directory / CONFIG_FILE} needs an int r and a number lora_alpha (got r={r!r}, "
            f"lora_alpha={alpha!r}) and {WEIGHTS_FILE} at least one adapter: a damaged PEFT adapter"
        )
    if peft.get("use_rslora"):
        alpha = alpha * math.sqrt(r)
    config = LoRAConfig(
        r=r,
        alpha=alpha,
        target_modules=sorted(adapted),
        dropout=peft.get("lora_dropout") or 0.0,
        modules_to_save=peft.get("modules_to_save") or (),
    )
    check_unpatched(model)
    restore = plan_checkpoint(model, config, saved, str(directory / WEIGHTS_FILE))
    commit(model, config, restore)
    patch_state(model).peft_config = peft  # re-saving keeps its fields (see save_peft)
    if str(peft.get("init_lora_weights")).lower() in FROZEN_B_INITS:
        for layer in patched_layers(model).values():  # MiCA trains lora_A only; lora_B holds the
            layer.lora_B.requires_grad_(False)  # weight's minor singular directions, frozen
    return hf_model.install(model)


def save_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write `model`'s LoRA adapters as a PEFT directory that `peft.PeftModel.from_pretrained` loads.

    A model loaded with `load_peft` keeps its adapter config's fields (initialisation, rsLoRA, task
    type, paths), so re-saving never rewrites a field into another meaning.
    """
    state = require_patched(model, " (nothing to save)")
    config = state.config
    if not isinstance(config, LoRAConfig):
        raise ValueError(
            f"format='peft' writes LoRA adapters; {config.method} has no PEFT equivalent: "
            f"use slimtune.save(model, dir) or slimtune.merge(model)"
        )
    layers = patched_layers(model)
    tensors = {
        f"{PREFIX}{name}.{kind}.weight": getattr(layer, kind).detach().to("cpu").contiguous()
        for name, layer in layers.items()
        for kind in ("lora_A", "lora_B")
    }
    rank, alpha = config.r, config.alpha
    if config.init != "random":
        # A CorDA adapter trains on the residual base W - s B0 A0. PEFT loads onto the original
        # base, so the change is written as one rank-2r LoRA: s (B A - B0 A0) = s [B B0] [A; -A0]
        # (as PEFT's own `path_initial_model_for_weight_conversion` does); alpha doubles with r.
        for name, (a0, b0) in state.extra.corda.items():
            a, b = (f"{PREFIX}{name}.{kind}.weight" for kind in ("lora_A", "lora_B"))
            tensors[a] = torch.cat([tensors[a], -a0.to(tensors[a].dtype)]).contiguous()
            tensors[b] = torch.cat([tensors[b], b0.to(tensors[b].dtype)], dim=1).contiguous()
        rank, alpha = 2 * config.r, 2 * config.alpha
    for key, parameter in full_modules.parameters(model, state.full_modules).items():
        tensors[PREFIX + key.removeprefix(full_modules.PREFIX)] = parameter.detach().to("cpu").contiguous()
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    loaded = state.peft_config or {}
    rslora = loaded.get("use_rslora") is True
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": name_or_path or None,
        "init_lora_weights": True,
        **{key: value for key, value in loaded.items() if key in INERT or key == "init_lora_weights"},
        "r": rank,
        "lora_alpha": loaded["lora_alpha"] if rslora else alpha,
        "use_rslora": rslora,
        "lora_dropout": config.dropout,
        "target_modules": sorted(layers),
        "modules_to_save": state.full_modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bound = {"format": "pt", files.CONFIG_DIGEST: files.json_digest(_meaning(peft))}
    files.write_together({  # all or nothing: never a new config beside old tensors
        directory / WEIGHTS_FILE: partial(files.save_tensors, tensors, metadata=bound),
        directory / CONFIG_FILE: partial(files.write_text, text=json.dumps(peft, indent=2) + "\n"),
    })  # fmt: skip
    return directory
