"""Soft prompts: trainable embeddings prepended to every input (prompt tuning), the first half of
ProMoT (Wang et al., "Preserving In-Context Learning ability in Large Language Model Fine-tuning").

`attach(model, prompt)` makes the model read the prompt's learned embeddings before its input,
through two hooks on the model (its pre-hook runs before any other, so lean mode diverts the
shifted labels, and a wrapped `forward`, such as accelerate's, is left alone): the first forward
of a sequence prepends them (and ones to the attention mask, -100 to the labels, `tokens` to the
positions; the input's first token is not a target, as without the prompt); later cached steps
only shift positions and the mask. Logits come back for the caller's positions only,
so losses, greedy decoding and `generate` see the model they called (hidden states keep the
prompt's positions). The prompt is not a parameter of the model: `model.parameters()`,
`state_dict` and `save_pretrained` do not hold it, so a later stage that trains the whole model
leaves it frozen, and it is saved and loaded on its own (`save`, `load`), bound to the model's
class and embedding width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import files

FORMAT = "slimtune-soft-prompt"
_ATTR = "_slimtune_prompt"
INITS = ("vocab", "zeros")


class SoftPrompt(nn.Module):
    """`tokens` x hidden trainable embeddings."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    @property
    def tokens(self) -> int:
        return self.weight.shape[0]


class _Prompted:
    """The prompt's two hooks on the model. Before its forward (ahead of every other pre-hook, such as
    lean mode's, which then sees the shifted labels): the prompt prepended on the first call of a
    sequence, positions, mask and labels shifted. After it: the logits of the caller's positions."""

    def __init__(self, prompt: SoftPrompt) -> None:
        self.prompt = prompt
        self.lengths: list[int | None] = []  # per call in flight: the prompted length of a first call

    def before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if len(args) > 1:
            raise TypeError("a model with a soft prompt takes keyword arguments after input_ids")
        kwargs = dict(kwargs)
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        n = self.prompt.tokens
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.25 names it `cache`
        first = past is None or past.get_seq_length() == 0
        if first:
            self._prepend(model, input_ids, kwargs)
        else:
            kwargs["input_ids"] = input_ids
            for key in ("position_ids", "cache_position"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key] + n
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
            _positions_from_mask(kwargs)
        self.lengths.append(kwargs["inputs_embeds"].shape[1] if first else None)
        return (), kwargs

    def after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
        length = self.lengths.pop() if self.lengths else None
        logits = getattr(out, "logits", None)
        if length is not None and logits is not None and logits.shape[1] == length:
            out.logits = logits[:, self.prompt.tokens :]
        return out

    def _prepend(self, model: nn.Module, input_ids: Tensor | None, kwargs: dict[str, Any]) -> None:
        """A sequence's first forward: the prompt's embeddings before the input's, and -100 labels
        and leading positions for them."""
        n, embeds = self.prompt.tokens, kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        rows = embeds.shape[0]
        prompt = self.prompt.weight.to(embeds.device, embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        labels = kwargs.get("labels")
        if labels is not None:
            # -100 over the prompt and on the first token too (which only the prompt would
            # predict): the loss is the one the returned logits give.
            kwargs["labels"] = torch.cat([labels.new_full((rows, n + 1), -100), labels[:, 1:]], dim=1)
        lead = torch.arange(n, device=embeds.device)
        if kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"]
            kwargs["position_ids"] = torch.cat([lead.expand(positions.shape[0], n), positions + n], dim=1)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.cat([lead, kwargs["cache_position"] + n])


@dataclass
class _Attachment:
    prompt: SoftPrompt
    handles: list[Any]


def _positions_from_mask(kwargs: dict[str, Any]) -> None:
    """Positions from the (prompt-extended) 2-D attention mask where the caller gave none: a left-padded
    row's tokens then follow the prompt directly, as in the row alone (transformers >= 5.25 counts
    positions over the padding, which RoPE forgives without a prompt, not with one)."""
    mask = kwargs["attention_mask"]
    if kwargs.get("position_ids") is not None or mask.dim() != 2:
        return
    new = (
        kwargs["inputs_embeds"].shape[1]
        if kwargs.get("inputs_embeds") is not None
        else kwargs["input_ids"].shape[1]
    )
    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


def attached(model: nn.Module) -> SoftPrompt | None:
    """The model's soft prompt, or None."""
    attachment = model.__dict__.get(_ATTR)
    return attachment.prompt if attachment is not None else None


def _embedding(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings): no soft prompt"
        )
    return embedding


def check(tokens: int, init: str) -> None:
    """ValueError unless `tokens` and `init` describe a soft prompt `make` can build."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 4096:
        raise ValueError(f"a soft prompt has 1 to 4096 tokens, got {tokens!r}")
    if init not in INITS:
        raise ValueError(f"soft prompt init is one of {', '.join(INITS)}, not {init!r}")


def make(model: nn.Module, tokens: int, init: str = "vocab", seed: int = 0) -> SoftPrompt:
    """A new prompt for `model`: the embeddings of `tokens` seeded random vocabulary entries
    ("vocab", which trains faster than noise) or zeros."""
    check(tokens, init)
    embedding = _embedding(model)
    if init == "zeros":
        return SoftPrompt(embedding.weight.new_zeros(tokens, embedding.embedding_dim))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, embedding.num_embeddings, (tokens,), generator=generator)
    return SoftPrompt(embedding.weight.detach()[ids.to(embedding.weight.device)].clone())


def attach(model: nn.Module, prompt: SoftPrompt) -> SoftPrompt:
    """Prepend `prompt` to every input of `model` (refused if one is attached, or the width differs)."""
    if attached(model) is not None:
        raise ValueError(f"{type(model).__name__} has a soft prompt already; slimtune.prompt.detach it first")
    width = _embedding(model).embedding_dim
    if prompt.weight.ndim != 2 or prompt.weight.shape[1] != width:
        raise ValueError(
            f"the soft prompt is {tuple(prompt.weight.shape)} but {type(model).__name__} embeds into "
            f"{width}: "
            f"it belongs to another model"
        )
    hooks = _Prompted(prompt)
    handles = [
        model.register_forward_pre_hook(hooks.before, with_kwargs=True, prepend=True),
        model.register_forward_hook(hooks.after, with_kwargs=True),
    ]
    object.__setattr__(model, _ATTR, _Attachment(prompt, handles))
    return prompt


def detach(model: nn.Module) -> SoftPrompt:
    """Remove the model's prompt (its hooks) and return it."""
    attachment = model.__dict__.get(_ATTR)
    if attachment is None:
        raise ValueError(f"{type(model).__name__} has no soft prompt to detach")
    for handle in attachment.handles:
        handle.remove()
    del model.__dict__[_ATTR]
    return attachment.prompt


def replace(model: nn.Module, prompt: SoftPrompt | None) -> None:
    """Attach `prompt` in place of the model's prompt, if any (None: leave the model without one)."""
    if attached(model) is not None:
        detach(model)
    if prompt is not None:
        attach(model, prompt)


@contextlib.contextmanager
def using(model: nn.Module, prompt: SoftPrompt | None) -> Iterator[nn.Module]:
    """Run `model` with `prompt` attached (None: with none) for the block, then as it was."""
    previous = attached(model)
    try:
        replace(model, prompt)
        yield model
    finally:
        replace(model, previous)


def _binding(model: nn.Module) -> dict[str, str]:
    embedding = _embedding(model)
    return {"format": FORMAT, "model_class": type(model).__name__, "width": str(embedding.embedding_dim)}


def save(model: nn.Module, path: str | Path) -> Path:
    """Write the attached prompt (with its model's class and width) to one tensor file."""
    prompt = attached(model)
    if prompt is None:
        raise ValueError(f"{type(model).__name__} has no soft prompt to save")
    files.save_tensors({"prompt": prompt.weight.detach().cpu().contiguous()}, path, metadata=_binding(model))
    return Path(path)


def load(model: nn.Module, path: str | Path) -> SoftPrompt:
    """Read a prompt written by `save` and attach it; refused (model untouched) for another model's."""
    tensors, metadata = files.read_tensors(path)
    expected = _binding(model)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a slimtune soft prompt (format {metadata.get('format')!r})")
    for key in ("model_class", "width"):
        if metadata.get(key) != expected[key]:
            raise ValueError(
                f"{path} is a soft prompt for {key} {metadata.get(key)!r}, but the model has "
                f"{expected[key]!r}"
            )
    weight = tensors.get("prompt")
    if set(tensors) != {"prompt"} or weight is None or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"{path} holds {sorted(tensors)}, not one float `prompt` matrix: a damaged file")
    embedding = _embedding(model).weight
    return attach(model, SoftPrompt(weight.to(embedding.device, embedding.dtype)))


__all__ = [
    "INITS",
    "SoftPrompt",
    "attach",
    "attached",
    "check",
    "detach",
    "load",
    "make",
    "replace",
    "save",
    "using",
]
