"""PEFT interop: load a PEFT LoRA adapter directory into slimtune layers, and write one PEFT loads.

A PEFT LoRA directory is `adapter_config.json` plus `adapter_model.safetensors` with tensors
`base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r); PEFT's scaling is
lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), the same product as slimtune's LoRALinear.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from . import files
from .config import LoRAConfig
from .methods.lora import LoRAMethod
from .state import check_unpatched, commit, patched_layers, require_patched

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KINDS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}

# PEFT LoRA options without a slimtune equivalent: refused unless off (None, False, "none", {} or []).
UNSUPPORTED = (
    "use_dora",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
)


def _is_off(value: Any) -> bool:
    return value in (None, False, "none", {}, [])


def _peft_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    for needed in (path, directory / WEIGHTS_FILE):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} not found: is {directory} a PEFT adapter directory (save_pretrained)?"
            )
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{path} describes a {config.get('peft_type')!r} adapter; slimtune.load_peft loads "
            f"PEFT LoRA adapters only"
        )
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", None):
        # PiSSA, OLoRA, CorDA, LoftQ, EVA...: PEFT rewrites the base weights (or builds them from data)
        # when it creates such an adapter, so these tensors are not an adapter on the plain base model.
        raise ValueError(
            f"{path} sets init_lora_weights={init!r}: PEFT changes the base weights for that initialisation, "
            f"so the adapter does not apply to this base model as saved; load it with peft (and merge), "
            f"or convert it with PEFT's own tools to a plain LoRA first"
        )
    if not _is_off(config.get("loftq_config")) or not _is_off(config.get("corda_config")):
        raise ValueError(f"{path} carries a LoftQ or CorDA configuration, which slimtune does not implement")
    for key in UNSUPPORTED:
        if not _is_off(config.get(key)):
            raise ValueError(
                f"{path} sets {key}={config[key]!r}, which slimtune's LoRA does not implement; "
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
    saved = {}
    for key, tensor in files.read_tensors(directory / WEIGHTS_FILE)[0].items():
        module, _, kind = key.removeprefix(PREFIX).partition(".lora_")
        if not key.startswith(PREFIX) or f"lora_{kind}" not in KINDS:
            raise ValueError(
                f"{directory / WEIGHTS_FILE} holds {key!r}, not a LoRA weight of a linear layer "
                f"({PREFIX}<module>.lora_A.weight / .lora_B.weight)"
            )
        saved[f"{module}.{KINDS[f'lora_{kind}']}"] = tensor
    r = peft["r"]
    alpha = peft["lora_alpha"] * (math.sqrt(r) if peft.get("use_rslora") else 1)
    names = sorted({key.rsplit(".", 1)[0] for key in saved})
    config = LoRAConfig(r=r, alpha=alpha, target_modules=names, dropout=peft.get("lora_dropout") or 0.0)
    check_unpatched(model)
    return commit(model, config, LoRAMethod().plan(model, config, saved))


def save_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write `model`'s LoRA adapters as a PEFT directory that `peft.PeftModel.from_pretrained` loads."""
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
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": name_or_path or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files.save_tensors(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    files.write_text(directory / CONFIG_FILE, json.dumps(peft, indent=2) + "\n")
    return directory
