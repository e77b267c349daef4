"""Sparse diffs: what a partial fine-tune changed, as changes to some entries of some parameters.

One type for every entry-level change: PaCA's columns and S2FT's rows (`slimtune.delta`, whole
rows or columns of a weight, stored compactly as one index per row or column, in the original
unpermuted layout), and the scattered single entries of LT-SFT masks and grafts (flat indices into
any parameter, embeddings included). A diff applies to and reverts from a plain base model in
place, saves to one safetensors file, and adds to other diffs, so several fine-tunes can be
switched or fused without keeping a full copy of each. Changes are stored in float64 and applied
in float64 before one rounding to the parameter's dtype, so base + diff reproduces the trained
weights and revert restores the base.

The file (`format: slimtune-delta`, `version: 2`) holds `NAME.index` and `NAME.values` per
parameter and each one's axis in the metadata; `load_delta` also reads the two formats written
before (version 1 deltas keyed by module, and the trainer's `slimtune-entry-diff` files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import files, ops, sharding
from .layers.partial import PartialLinear
from .layers.qpaca import QPaCALinear
from .methods import method_for
from .state import patch_state, patched_layers, require_patched
from .transaction import Transaction

FORMAT, VERSION = "slimtune-delta", "2"
ENTRY_DIFF_FORMAT = "slimtune-entry-diff"  # the trainer's entry diffs before version 2 (read only)
ENTRIES = None  # the axis of scattered entries: flat indices into the parameter


@dataclass(frozen=True)
class DeltaEntry:
    """The change of `parameter[index, :]` (axis 0), `parameter[:, index]` (axis 1), or of the
    entries `parameter.flatten()[index]` (axis None, `ENTRIES`)."""

    axis: int | None
    index: Tensor
    values: Tensor

    @property
    def count(self) -> int:
        """How many entries of the parameter change."""
        return self.values.numel()


class SparseDelta:
    """A sparse diff over the parameters of a base model, keyed by parameter name; see the module
    docstring."""

    def __init__(self, entries: dict[str, DeltaEntry]) -> None:
        self.entries = entries

    def __repr__(self) -> str:
        count = sum(e.count for e in self.entries.values())
        return f"SparseDelta({len(self.entries)} parameters, {count} entries)"

    @classmethod
    def between(cls, model: nn.Module, start: dict[str, Tensor], masks: dict[str, Tensor]) -> SparseDelta:
        """The change of `model` from `start` on the masked entries (scattered entries: LT-SFT)."""
        entries = {}
        for name, mask in masks.items():
            index = mask.flatten().nonzero().flatten().cpu()
            now = model.get_parameter(name).detach().flatten().cpu()
            change = now[index].double() - start[name].flatten().cpu()[index].double()
            entries[name] = DeltaEntry(ENTRIES, index, change)
        return cls(entries)

    def _check(self, model: nn.Module) -> list[tuple[Tensor, DeltaEntry]]:
        """Resolve every target parameter first, so a bad diff leaves the model untouched."""
        if patch_state(model) is not None:
            raise ValueError("apply a SparseDelta to a plain base model; call slimtune.merge(model) first")
        return [(_target(model, name, entry), entry) for name, entry in self.entries.items()]

    def apply(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """parameter[entries] += scale * change, in place; returns the model."""
        resolved = self._check(model)
        with torch.no_grad(), Transaction(model) as transaction:
            for parameter, entry in resolved:
                target, axis = (parameter.view(-1), 0) if entry.axis is ENTRIES else (parameter, entry.axis)
                index = entry.index.to(target.device)
                current = target.index_select(axis, index).double()
                updated = (current + scale * entry.values.to(target.device)).to(target.dtype)
                transaction.keep_entries(target, index, axis)
                target.index_copy_(axis, index, updated)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Undo `apply` (parameter[entries] -= change), in place; returns the model."""
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
                raise ValueError(
                    f"cannot add diffs of {name!r} over different layouts (axes {mine.axis} and {entry.axis})"
                )
            dim = 0 if mine.axis is ENTRIES else mine.axis
            index, values = add_sparse(mine.index, mine.values, entry.index, entry.values, dim)
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
        metadata = {"format": FORMAT, "version": VERSION, "axes": json.dumps(axes)}
        files.save_tensors(tensors, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SparseDelta:
        """Read a diff file of this version or of the two formats before it (see the module docstring)."""
        tensors, metadata = files.read_tensors(path)
        kind = metadata.get("format")
        if kind not in (FORMAT, ENTRY_DIFF_FORMAT):
            raise ValueError(f"{path} is not a sparse diff written by slimtune (format {kind!r})")
        pairs = files.index_value_pairs(tensors, path)
        if kind == ENTRY_DIFF_FORMAT:
            return cls({name: DeltaEntry(ENTRIES, *pair) for name, pair in pairs.items()})
        axes = _axes(metadata, set(pairs), path)
        if metadata.get("version") is None:  # version 1: PaCA/S2FT deltas keyed by the linear module
            return cls({f"{name}.weight": DeltaEntry(axes[name], *pairs[name]) for name in pairs})
        if metadata["version"] != VERSION:
            raise ValueError(
                f"{path} is a slimtune delta of version {metadata['version']!r}; this slimtune reads "
                f"versions 1 and {VERSION}: upgrade slimtune"
            )
        return cls({name: DeltaEntry(axes[name], *pairs[name]) for name in pairs})


def _axes(metadata: dict[str, str], names: set[str], path: str | Path) -> dict[str, int | None]:
    try:
        axes = json.loads(metadata.get("axes", ""))
    except json.JSONDecodeError:
        axes = None
    if not isinstance(axes, dict) or set(axes) != names:
        raise ValueError(f"{path}: its axes metadata does not name exactly its entries: a damaged delta")
    return axes


def _target(model: nn.Module, name: str, entry: DeltaEntry) -> Tensor:
    """The parameter `name` of `model` after checking that `entry` fits it (ValueError if not)."""
    try:
        parameter = model.get_parameter(name)
    except AttributeError:
        raise ValueError(f"diff entry {name!r} is not a parameter of {type(model).__name__}") from None
    if entry.axis not in (0, 1, ENTRIES):
        raise ValueError(
            f"diff entry {name!r} has axis {entry.axis!r}; 0 (rows), 1 (columns), None (entries)"
        )
    if entry.axis is ENTRIES:
        size, expected = parameter.numel(), list(entry.index.shape)
    elif parameter.dim() != 2:
        raise ValueError(f"diff entry {name!r} changes rows or columns of a {parameter.dim()}-D parameter")
    else:
        size, expected = parameter.shape[entry.axis], list(parameter.shape)
        expected[entry.axis] = entry.index.numel()
    # One rule for every index (range, no wrap-around of -1, no entry twice), before any write.
    try:
        ops.check_index(entry.index, size, f"diff entry {name!r}", distinct=True)
    except ValueError as err:
        raise ValueError(f"{err}: the diff belongs to another model, or is damaged") from None
    if list(entry.values.shape) != expected:
        raise ValueError(
            f"diff entry {name!r} holds values of shape {tuple(entry.values.shape)} but the parameter "
            f"{tuple(parameter.shape)} needs {tuple(expected)}: the diff belongs to another model"
        )
    if not entry.values.is_floating_point():
        raise TypeError(f"diff entry {name!r} holds {entry.values.dtype} values; expected floats")
    if entry.axis is ENTRIES and not parameter.is_contiguous():
        raise ValueError(
            f"diff entry {name!r}: the parameter is not contiguous, so its entries have no flat view"
        )
    return parameter


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
        if not isinstance(layer, PartialLinear | QPaCALinear):
            raise ValueError(
                f"slimtune.delta covers partial methods (PaCA, S2FT); {name!r} is {type(layer).__name__}"
            )
        change = layer.change()
        index = method.original_index(name, layer, state.extra)
        order = torch.argsort(index)  # entries sorted by original index
        entries[f"{name}.weight"] = DeltaEntry(
            layer.axis, index[order].cpu(), change.index_select(layer.axis, order.to(change.device)).cpu()
        )
    return SparseDelta(entries)


def load_delta(path: str | Path) -> SparseDelta:
    """Read a diff written by `SparseDelta.save` (or by an older slimtune, see the module docstring)."""
    return SparseDelta.load(path)
