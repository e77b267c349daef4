"""Sparse diffs: what a partial fine-tune changed, in the base model's original layout.

A diff holds, per weight, the trained rows or columns (indices in the original, unpermuted
layout) and the change of their values. It applies to and reverts from a plain base model in
place, saves to one safetensors file, and adds to other diffs, so several fine-tunes can be
switched or fused without keeping a full copy of each. Changes are stored in float64 and applied
in float64 before rounding to the weight's dtype, so base + diff reproduces the trained weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import files, ops, sharding
from .layers.partial import PartialLinear
from .methods import method_for
from .state import patch_state, patched_layers, require_patched
from .transaction import Transaction


@dataclass(frozen=True)
class DeltaEntry:
    """The change of `weight[:, index]` (axis 1) or `weight[index, :]` (axis 0) of one module."""

    axis: int
    index: Tensor
    values: Tensor


class SparseDelta:
    """A sparse diff over the linears of a base model; see the module docstring."""

    def __init__(self, entries: dict[str, DeltaEntry]) -> None:
        self.entries = entries

    def __repr__(self) -> str:
        count = sum(e.values.numel() for e in self.entries.values())
        return f"SparseDelta({len(self.entries)} weights, {count} entries)"

    def _check(self, model: nn.Module) -> list[tuple[Tensor, DeltaEntry]]:
        """Resolve every target weight first, so a bad diff leaves the model untouched."""
        if patch_state(model) is not None:
            raise ValueError("apply a SparseDelta to a plain base model; call slimtune.merge(model) first")
        resolved = []
        for name, entry in self.entries.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"delta module {name!r} does not exist in {type(model).__name__}") from None
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) or weight is None:
                raise ValueError(f"delta module {name!r} is {type(module).__name__}, not an nn.Linear")
            if entry.axis not in (0, 1):
                raise ValueError(f"delta of {name!r} has axis {entry.axis!r}; 0 (rows) or 1 (columns)")
            expected = list(weight.shape)
            expected[entry.axis] = entry.index.numel()
            if list(entry.values.shape) != expected:
                raise ValueError(
                    f"delta of {name!r} is {tuple(entry.values.shape)} but the weight {tuple(weight.shape)} "
                    f"needs {tuple(expected)}: the delta belongs to another model"
                )
            # One rule for every index (range, no wrap-around of -1, no entry twice), before any write.
            try:
                ops.check_index(entry.index, weight.shape[entry.axis], f"delta of {name!r}", distinct=True)
            except ValueError as err:
                raise ValueError(f"{err}: the delta belongs to another model, or is damaged") from None
            if not entry.values.is_floating_point():
                raise TypeError(f"delta of {name!r} holds {entry.values.dtype} values; expected floats")
            resolved.append((weight, entry))
        return resolved

    def apply(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """weight[entries] += scale * change, in place; returns the model."""
        resolved = self._check(model)
        with torch.no_grad(), Transaction(model) as transaction:
            for weight, entry in resolved:
                index = entry.index.to(weight.device)
                current = weight.index_select(entry.axis, index).double()
                updated = (current + scale * entry.values.to(weight.device)).to(weight.dtype)
                transaction.keep_entries(weight, index, entry.axis)
                weight.index_copy_(entry.axis, index, updated)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Undo `apply` (weight[entries] -= change), in place; returns the model."""
        return self.apply(model, scale=-1.0)

    def __add__(self, other: SparseDelta) -> SparseDelta:
        """Fuse two diffs: changes to the same entries add up."""
        entries = dict(self.entries)
        for name, entry in other.entries.items():
            mine = entries.get(name)
            if mine is None:
                entries[name] = entry
                continue
            if mine.axis != entry.axis:
                raise ValueError(f"cannot add deltas of {name!r} over different axes (rows and columns)")
            index, values = add_sparse(mine.index, mine.values, entry.index, entry.values, mine.axis)
            entries[name] = DeltaEntry(mine.axis, index, values)
        return SparseDelta(entries)

    def save(self, path: str | Path) -> Path:
        """One safetensors file; the axis of each entry goes into its metadata."""
        path = Path(path)
        tensors, axes = {}, {}
        for name, entry in self.entries.items():
            tensors[f"{name}.index"] = entry.index.contiguous()
            tensors[f"{name}.values"] = entry.values.contiguous()
            axes[name] = entry.axis
        files.save_tensors(tensors, path, metadata={"format": "slimtune-delta", "axes": json.dumps(axes)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> SparseDelta:
        tensors, metadata = files.read_tensors(path)
        if metadata.get("format") != "slimtune-delta":
            raise ValueError(f"{path} is not a slimtune delta file (written by SparseDelta.save)")
        pairs = files.index_value_pairs(tensors, path)
        try:
            axes = json.loads(metadata.get("axes", ""))
        except json.JSONDecodeError:
            axes = None
        if not isinstance(axes, dict) or set(axes) != set(pairs):
            raise ValueError(f"{path}: its axes metadata does not name exactly its entries: a damaged delta")
        return cls({name: DeltaEntry(axes[name], *pairs[name]) for name in pairs})


def add_sparse(
    index_a: Tensor, values_a: Tensor, index_b: Tensor, values_b: Tensor, dim: int = 0
) -> tuple[Tensor, Tensor]:
    """The union of two sparse changes along `dim` (sorted index, float64 values); overlaps add up."""
    index = torch.cat([index_a, index_b]).unique(sorted=True)
    shape = list(values_a.shape)
    shape[dim] = index.numel()
    values = torch.zeros(shape, dtype=torch.float64)
    for part_index, part_values in ((index_a, values_a), (index_b, values_b)):
        values.index_add_(dim, torch.searchsorted(index, part_index), part_values.double())
    return index, values


def delta(model: nn.Module) -> SparseDelta:
    """The trained change of a patched model (PaCA, S2FT) as a sparse diff in the original layout."""
    state = require_patched(model, " (no trained change)")
    sharding.refuse_sharded(model, "delta")
    method = method_for(state.config)
    entries = {}
    for name, layer in patched_layers(model).items():
        if not isinstance(layer, PartialLinear):
            raise ValueError(
                f"slimtune.delta covers partial methods (PaCA, S2FT); {name!r} is {type(layer).__name__}"
            )
        change = layer.change()
        index = method.original_index(name, layer, state.extra)
        order = torch.argsort(index)  # entries sorted by original index
        entries[name] = DeltaEntry(
            layer.axis, index[order].cpu(), change.index_select(layer.axis, order.to(change.device)).cpu()
        )
    return SparseDelta(entries)


def load_delta(path: str | Path) -> SparseDelta:
    """Read a diff written by `SparseDelta.save`."""
    return SparseDelta.load(path)
