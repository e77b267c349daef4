"""One diff type for every entry-level change: rows, columns and scattered entries in one
SparseDelta, one file format, and the two formats written before it still read (old run folders
and saved deltas keep working) and mean the same change."""

from __future__ import annotations

import json

import pytest
import slimtune
import torch
from safetensors.torch import save_file
from slimtune.sparse_delta import ENTRIES, DeltaEntry, SparseDelta
from tiny_models import make_model

UP, DOWN, NORM = (
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
)


def _mixed(model: torch.nn.Module) -> SparseDelta:
    """Rows of one weight, columns of another, scattered entries of a norm: all three layouts."""
    generator = torch.Generator().manual_seed(0)
    up, down = model.get_parameter(UP), model.get_parameter(DOWN)
    return SparseDelta(
        {
            UP: DeltaEntry(
                0, torch.tensor([2, 7]), torch.randn(2, up.shape[1], generator=generator).double()
            ),
            DOWN: DeltaEntry(
                1, torch.tensor([1, 4, 9]), torch.randn(down.shape[0], 3, generator=generator).double()
            ),
            NORM: DeltaEntry(ENTRIES, torch.tensor([0, 5]), torch.randn(2, generator=generator).double()),
        }
    )


def _expected(model: torch.nn.Module, delta: SparseDelta) -> dict[str, torch.Tensor]:
    """The parameters with the change added by hand, in float64 and rounded once."""
    result = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, entry in delta.entries.items():
        target = result[name].double()
        if entry.axis is ENTRIES:
            target.view(-1)[entry.index] += entry.values
        elif entry.axis == 0:
            target[entry.index] += entry.values
        else:
            target[:, entry.index] += entry.values
        result[name] = target.to(result[name].dtype)
    return result


def test_rows_columns_and_entries_apply_save_load_and_revert_exactly(tmp_path) -> None:
    model = make_model("llama")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = _mixed(model)
    expected = _expected(model, delta)
    reloaded = slimtune.load_delta(delta.save(tmp_path / "d.safetensors"))
    assert {n: e.axis for n, e in reloaded.entries.items()} == {UP: 0, DOWN: 1, NORM: ENTRIES}
    reloaded.apply(model)
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    reloaded.revert(model)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, start[name], rtol=0, atol=1e-6)


def test_adding_diffs_of_different_layouts_of_one_parameter_is_refused() -> None:
    rows = SparseDelta({UP: DeltaEntry(0, torch.tensor([0]), torch.ones(1, 64).double())})
    entries = SparseDelta({UP: DeltaEntry(ENTRIES, torch.tensor([0]), torch.ones(1).double())})
    with pytest.raises(ValueError, match="different layouts"):
        rows + entries


def test_a_version_1_delta_file_reads_as_the_same_change(tmp_path) -> None:
    """Deltas saved before one type held every layout were keyed by the linear module."""
    model = make_model("llama")
    delta = _mixed(model)
    delta.entries.pop(NORM)  # version 1 held rows and columns of linears only
    tensors, axes = {}, {}
    for name, entry in delta.entries.items():
        module = name.removesuffix(".weight")
        tensors[f"{module}.index"], tensors[f"{module}.values"] = entry.index, entry.values
        axes[module] = entry.axis
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"format": "slimtune-delta", "axes": json.dumps(axes)})
    old = slimtune.load_delta(path)
    assert old.entries.keys() == delta.entries.keys()
    assert all(
        torch.equal(old.entries[n].values, e.values) and old.entries[n].axis == e.axis
        for n, e in delta.entries.items()
    )


def test_a_trainer_entry_diff_file_reads_as_scattered_entries(tmp_path) -> None:
    """LT-SFT stages and grafts of older run folders saved `slimtune-entry-diff` files."""
    model = make_model("llama")
    index, values = torch.tensor([1, 3, 8]), torch.randn(3).double()
    path = tmp_path / "diff.safetensors"
    save_file(
        {f"{NORM}.index": index, f"{NORM}.values": values},
        str(path),
        metadata={"format": "slimtune-entry-diff"},
    )
    old = slimtune.load_delta(path)
    assert old.entries[NORM].axis is ENTRIES and torch.equal(old.entries[NORM].index, index)
    expected = model.get_parameter(NORM).detach().double().clone()
    expected[index] += values
    old.apply(model)
    assert torch.equal(model.get_parameter(NORM), expected.float())


def test_a_newer_version_or_another_file_is_refused_by_name(tmp_path) -> None:
    model = make_model("llama")
    path = _mixed(model).save(tmp_path / "d.safetensors")
    tensors, metadata = slimtune.files.read_tensors(path)
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={**metadata, "version": "9"})
    with pytest.raises(ValueError, match=r"version '9'.*upgrade slimtune"):
        slimtune.load_delta(tmp_path / "v9.safetensors")
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a sparse diff written by slimtune"):
        slimtune.load_delta(tmp_path / "other.safetensors")


def test_a_paca_delta_is_keyed_by_parameter_and_fits_the_base(tmp_path) -> None:
    base = make_model("llama")
    model = slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=4, target_modules=["up_proj"]))
    with torch.no_grad():
        for parameter in slimtune.trainable_parameters(model):
            parameter.add_(0.5)
    delta = slimtune.delta(model)
    assert all(name.endswith("mlp.up_proj.weight") and e.axis == 1 for name, e in delta.entries.items())
    slimtune.merge(model)
    delta.apply(base)
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in base.named_parameters())
