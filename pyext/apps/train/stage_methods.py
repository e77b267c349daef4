"""How a stage trains: which parameters, and how its checkpoint (only what changed) is saved and restored.

`full`, `hft` and `sparse-diff` live here; every method with a `slimtune` config (PaCA, S2FT,
LoRA, Hydra, and any added later) goes through `slimtune.apply`, `save`, `load` and `merge`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slimtune
import torch
from slimtune.registry import SPARSE_DELTA
from torch import Tensor, nn

DIFF_FILE = "diff.safetensors"


@dataclass
class Context:
    """What a method may use while setting up a stage: the stage's seed and a way to train (LT-SFT)."""

    seed: int
    train: Callable[[list[nn.Parameter], int], None]
    samples: Any = None  # CorDA's covariance rows (a `Packed`), where the method needs them


class StageMethod:
    """Full fine-tuning; the base of the others. One instance per stage (it holds that stage's state)."""

    name = "full"
    writes_diff = False  # whether the stage leaves a sparse diff for add_diff / revert_diff

    def check(self, model: nn.Module) -> None:
        """Raise ValueError if the model cannot take this method (before any training)."""

    def setup(self, model: nn.Module, context: Context) -> list[nn.Parameter]:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return list(model.parameters())

    def save(self, model: nn.Module, directory: Path) -> None:
        """The trained tensors, whole (a dense method changes every entry of them)."""
        trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        slimtune.files.save_tensors(trained, directory / "trained.safetensors")

    def restore(self, model: nn.Module, directory: Path) -> None:
        """Redo a finished stage from its checkpoint (on `--resume`)."""
        path = directory / "trained.safetensors"
        tensors, _ = slimtune.files.read_tensors(path)
        params = dict(model.named_parameters())
        for name, tensor in tensors.items():  # all checked before the first write
            if name not in params or params[name].shape != tensor.shape or not tensor.is_floating_point():
                raise ValueError(
                    f"{path}: {name!r} ({tuple(tensor.shape)}, {tensor.dtype}) is not a parameter of this "
                    f"model of that shape: the run folder belongs to another model, or is damaged"
                )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)

    def finish(self, model: nn.Module) -> None:
        """Leave a plain model (no slimtune layers, no hooks) for evaluation and the next stage."""


class HFT(StageMethod):
    """Half fine-tuning: a fresh random half of every block per stage; the rest frozen, no optimizer state."""

    name = "hft"

    def check(self, model: nn.Module) -> None:
        slimtune.toolbox.hft.check(model)

    def setup(self, model: nn.Module, context: Context) -> list[nn.Parameter]:
        return slimtune.toolbox.hft.freeze(model, context.seed)


class SparseDiff(StageMethod):
    """LT-SFT: a short dense phase picks the `k` entries that moved most; reset, then train only those.

    `k` is a count of entries or a fraction of all parameters. Masked gradients with no weight
    decay leave every other entry exactly at its start value, so the stage is a sparse diff.
    """

    name = "sparse-diff"
    writes_diff = True

    def __init__(self, k: int | float = 0.01, dense_steps: int = 20) -> None:
        if (
            isinstance(k, bool)
            or not isinstance(k, int | float)
            or k <= 0
            or (isinstance(k, float) and k > 1)
        ):
            raise ValueError(f"sparse-diff k must be an entry count >= 1 or a fraction in (0, 1], got {k!r}")
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 1:
            raise ValueError(f"sparse-diff dense_steps must be an int >= 1, got {dense_steps!r}")
        self.k, self.dense_steps = k, dense_steps
        self._start: dict[str, Tensor] = {}
        self._masks: dict[str, Tensor] = {}
        self._hooks: list[Any] = []

    def setup(self, model: nn.Module, context: Context) -> list[nn.Parameter]:
        params = super().setup(model, context)
        self._start = slimtune.toolbox.params.snapshot(model)
        context.train(params, self.dense_steps)
        self._masks = slimtune.toolbox.ltsft.top_k_masks(model, self._start, self.k)
        slimtune.toolbox.params.restore(model, self._start)
        self._hooks = slimtune.toolbox.ltsft.mask_gradients(model, self._masks)
        return params

    def save(self, model: nn.Module, directory: Path) -> None:
        slimtune.SparseDelta.between(model, self._start, self._masks).save(directory / DIFF_FILE)

    def restore(self, model: nn.Module, directory: Path) -> None:
        slimtune.load_delta(directory / DIFF_FILE).apply(model)

    def finish(self, model: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._start, self._masks = [], {}, {}


class Patched(StageMethod):
    """A slimtune method (`slimtune.apply`): the checkpoint is `slimtune.save`; PaCA and S2FT also leave
    their change as a `slimtune.delta` diff."""

    def __init__(self, config: slimtune.MethodConfig) -> None:
        self.config = config
        self.name = config.method
        self.writes_diff = slimtune.registry.for_config(config).has(SPARSE_DELTA)
        self._corda = getattr(config, "init", None) in slimtune.corda.MODES

    def check(self, model: nn.Module) -> None:
        # Validates every target without touching the model (CorDA: all but its data, which comes
        # only at setup).
        if self._corda:
            slimtune.corda.check(model, self.config)
        else:
            slimtune.registry.for_config(self.config).glue.plan(model, self.config)

    def setup(self, model: nn.Module, context: Context) -> list[nn.Parameter]:
        if not self._corda:
            slimtune.apply(model, self.config)
        else:  # CorDA: the adapter from the input covariance on the stage's samples
            rows = context.samples
            device = next(model.parameters()).device
            batches = [
                {
                    "input_ids": rows.ids[i : i + 8].to(device),
                    "attention_mask": rows.mask[i : i + 8].to(device),
                }
                for i in range(0, len(rows), 8)
            ]
            covariance = slimtune.corda.covariances(model, batches, self.config.target_modules)
            slimtune.corda.apply(model, self.config, covariance)
        return slimtune.trainable_parameters(model)

    def save(self, model: nn.Module, directory: Path) -> None:
        slimtune.save(model, directory / "slimtune")
        if self.writes_diff:
            slimtune.delta(model).save(directory / DIFF_FILE)

    def restore(self, model: nn.Module, directory: Path) -> None:
        slimtune.merge(slimtune.load(model, directory / "slimtune"))

    def finish(self, model: nn.Module) -> None:
        slimtune.merge(model)


PROMPT_FILE = "prompt.safetensors"


class SoftPrompt(StageMethod):
    """ProMoT's first stage: only a new soft prompt of `tokens` embeddings trains (`slimtune.prompt`),
    the model frozen; it stays attached, frozen, for the next stages (replacing an earlier prompt)."""

    name = "prompt"

    def __init__(self, tokens: int = 20, init: str = "vocab") -> None:
        slimtune.prompt.check(tokens, init)
        self.tokens, self.init = tokens, init

    def check(self, model: nn.Module) -> None:
        slimtune.prompt.make(model, 1)

    def setup(self, model: nn.Module, context: Context) -> list[nn.Parameter]:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        slimtune.prompt.replace(model, slimtune.prompt.make(model, self.tokens, self.init, context.seed))
        prompt = slimtune.prompt.attached(model)
        prompt.weight.requires_grad_(True)
        return [prompt.weight]

    def save(self, model: nn.Module, directory: Path) -> None:
        slimtune.prompt.save(model, directory / PROMPT_FILE)

    def restore(self, model: nn.Module, directory: Path) -> None:
        slimtune.prompt.replace(model, None)
        slimtune.prompt.load(model, directory / PROMPT_FILE)

    def finish(self, model: nn.Module) -> None:
        slimtune.prompt.attached(model).weight.requires_grad_(False)


RECIPE_METHODS: dict[str, Callable[..., StageMethod]] = {
    "full": StageMethod,
    "hft": HFT,
    "sparse-diff": SparseDiff,
    "prompt": SoftPrompt,
}


def method_options(name: str) -> dict[str, bool]:
    """The options of method `name`, each mapped to whether it is required; ValueError if unknown."""
    if name in RECIPE_METHODS:
        parameters = inspect.signature(RECIPE_METHODS[name]).parameters.values()
        return {p.name: p.default is inspect.Parameter.empty for p in parameters}
    fields = dataclasses.fields(slimtune.registry.get(name).config)
    return {
        f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields
    }


def known_methods() -> list[str]:
    return sorted({*RECIPE_METHODS, *slimtune.registry.methods()})


def make_method(name: str, options: dict[str, Any]) -> StageMethod:
    """A stage's method from checked option names; ValueError/TypeError for a bad value."""
    if name in RECIPE_METHODS:
        return RECIPE_METHODS[name](**options)
    return Patched(slimtune.registry.get(name).config(**options))
