"""The recipe's model: a local Hugging Face directory with its tokenizer, a built-in pretrained model
(`slimtune.models`, e.g. smollm2-135m), or a built-in random-init Llama (tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slimtune
import torch
from torch import nn

from .. import progress
from .tokenizer import CharTokenizer, HFTokenizer, Tokenizer

# Built-in shapes: "tiny" for tests (seconds), "small" for the demo (minutes on a CPU).
BUILTIN: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small-llama": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """`builtin` (a name in BUILTIN, with `config` overrides of its LlamaConfig) or a local `path`."""

    builtin: str | None = None
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    where: str = ""


def llama_keys() -> set[str]:
    """The keys a built-in model's `config` may override (LlamaConfig accepts anything silently)."""
    import transformers

    return set(transformers.LlamaConfig().to_dict())


@contextlib.contextmanager
def _loading(what: str) -> Iterator[None]:
    """Our progress phase, with transformers' own bars off (their frames would break our line)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with progress.phase(what):
            yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def build(spec: ModelSpec, seed: int) -> tuple[nn.Module, Tokenizer]:
    """The model (random weights drawn from `seed` for built-ins) and its tokenizer."""
    import transformers

    dtype = DTYPES[spec.dtype]
    if spec.builtin in slimtune.models.BUILTINS:
        if not slimtune.models.is_built(spec.builtin):
            with _loading(f"converting the built-in model {spec.builtin} from GGUF (once)"):
                slimtune.models.path(spec.builtin)
        path = slimtune.models.path(spec.builtin)
        with _loading(f"loading {spec.builtin}"):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="eager"
            )
        return model, HFTokenizer(path)
    if spec.path is not None:
        with _loading(f"loading {spec.path}"):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(spec.path), dtype=dtype)
        return model, HFTokenizer(spec.path)
    tokenizer = CharTokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        **{**BUILTIN[spec.builtin], **spec.config},
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(dtype), tokenizer
