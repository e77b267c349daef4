"""Entry-level sparse diffs (LT-SFT masks, grafts): any parameter, any scattered entries.

`SparseDelta` stores whole rows or columns of linears (what PaCA and S2FT train); an
LT-SFT mask picks single entries anywhere, embeddings included, so it gets this container with the
same API: `apply`, `revert`, `d1 + d2`, `save`, `load`. Changes are float64 and applied in float64
before one rounding, so base + diff reproduces the trained weights and revert restores the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .. import files, ops
from ..sparse_delta import SparseDelta, add_sparse, load_delta
from ..transaction import Transaction

FORMAT = "slimtune-entry-diff"


class EntryDiff:
    """Per parameter name: sorted flat indices and the float64 change at each."""

    def __init__(self, entries: dict[str, tuple[Tensor, Tensor]]) -> None:
        self.entries = entries

    def __repr__(self) -> str:
        count = sum(index.numel() for index, _ in self.entries.values())
        return f"EntryDiff({len(self.entries)} tensors, {count} entries)"

    @classmethod
    def between(cls, model: nn.Module, start: dict[str, Tensor], masks: dict[str, Tensor]) -> EntryDiff:
        """The change of `model` from `start` on the masked entries."""
        entries = {}
        for name, mask in masks.items():
            index = mask.flatten().nonzero().flatten().cpu()
            now = model.get_parameter(name).detach().flatten().cpu()
            entries[name] = (index, now[index].double() - start[name].flatten().cpu()[index].double())
        return cls(entries)

    def apply(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """parameter[entries] += scale * change, in place (all names are checked first)."""
        params = {}
        for name, (index, values) in self.entries.items():
            try:
                params[name] = model.get_parameter(name)
            except AttributeError:
                raise ValueError(
                    f"diff entry {name!r} is not a parameter of {type(model).__name__}"
                ) from None
            # Every entry is checked before the first write: range (no -1 wrap-around), distinct, lengths.
            ops.check_index(index, params[name].numel(), f"diff entry {name!r}", distinct=True)
            if values.shape != index.shape or not values.is_floating_point():
                raise ValueError(
                    f"diff entry {name!r} has {tuple(index.shape)} indices but values of shape "
                    f"{tuple(values.shape)} and dtype {values.dtype}: a damaged diff"
                )
        with torch.no_grad(), Transaction(model) as transaction:
            for name, (index, values) in self.entries.items():
                flat = params[name].view(-1)
                where = index.to(flat.device)
                updated = (flat[where].double() + scale * values.to(flat.device)).to(flat.dtype)
                transaction.keep_entries(flat, where, 0)
                flat[where] = updated
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        return self.apply(model, scale=-1.0)

    def __add__(self, other: EntryDiff) -> EntryDiff:
        """Fuse two diffs: changes to the same entries add up."""
        entries = dict(self.entries)
        for name, (index, values) in other.entries.items():
            if name in entries:
                entries[name] = add_sparse(*entries[name], index, values)
            else:
                entries[name] = (index, values)
        return EntryDiff(entries)

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for name, (index, values) in self.entries.items():
            tensors[f"{name}.index"], tensors[f"{name}.values"] = index.contiguous(), values.contiguous()
        files.save_tensors(tensors, path, metadata={"format": FORMAT})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> EntryDiff:
        tensors, _ = files.read_tensors(path)
        return cls(files.index_value_pairs(tensors, path))


def load_diff(path: str | Path) -> EntryDiff | SparseDelta:
    """A diff file of either kind: entry-level (LT-SFT) or `slimtune.delta` (PaCA, S2FT)."""
    kind = files.read_metadata(path).get("format")  # the loader below reads the tensors once
    if kind == FORMAT:
        return EntryDiff.load(path)
    if kind == "slimtune-delta":
        return load_delta(path)
    raise ValueError(f"{path} is not a sparse diff written by slimtune (format {kind!r})")
