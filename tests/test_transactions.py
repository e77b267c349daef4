"""Every change to a model is all or nothing: a failure after the first write (an allocation while
building layers, a device error mid-permutation) rolls the model back to exactly what it was, and a
later good call gives the right model."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
from slimtune.layers import HydraLinear, LoRALinear, PaCALinear, S2FTLinear
from slimtune.methods.s2ft import Permutation
from slimtune.sparse_delta import ENTRIES, DeltaEntry, SparseDelta
from slimtune.transaction import Transaction
from test_refusals import assert_untouched, refused, snapshot
from tiny_models import make_batch, make_model

CONFIGS = {
    "paca": (slimtune.PaCAConfig(r=4), PaCALinear),
    "s2ft": (slimtune.S2FTConfig(heads=2, channels=8), S2FTLinear),
    "lora": (slimtune.LoRAConfig(r=4, alpha=8), LoRALinear),
    "hydra": (slimtune.HydraConfig(r_parallel=4, r_sequential=2, alpha=8), HydraLinear),
}


def fail_on_call(monkeypatch, owner, attribute: str, n: int, error: type[BaseException]) -> None:
    """Make `owner.attribute` raise `error` on its n-th call (the earlier calls run as usual)."""
    original, calls = getattr(owner, attribute), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained(method: str, seed: int = 0):
    """A model patched with `method` whose trained tensors moved away from the base."""
    model = make_model("llama")
    slimtune.apply(model, CONFIGS[method][0])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in slimtune.trainable_parameters(model):
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_a_failure_while_building_layers_rolls_apply_back(method, error, monkeypatch) -> None:
    config, layer_class = CONFIGS[method]
    model, ids = make_model("llama"), make_batch()
    expected = logits(model, ids)
    with monkeypatch.context() as patch:
        fail_on_call(patch, layer_class, "__init__", 3, error)
        refused(model, lambda: slimtune.apply(model, config), error, "injected failure")
    slimtune.apply(model, config)  # a later good apply, then merge: the base model's outputs again
    assert torch.equal(logits(slimtune.merge(model), ids), expected)


def test_a_failure_mid_permutation_rolls_s2ft_back(monkeypatch) -> None:
    model = make_model("qwen2")  # biases are permuted too
    with monkeypatch.context() as patch:
        fail_on_call(patch, Permutation, "apply", 7, torch.OutOfMemoryError)
        refused(model, lambda: slimtune.apply(model, CONFIGS["s2ft"][0]), torch.OutOfMemoryError, "injected")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_failure_after_checkpoint_values_were_written_rolls_load_back(method, tmp_path, monkeypatch):
    directory = slimtune.save(trained(method), tmp_path / method)
    model, layer_class = make_model("llama"), CONFIGS[method][1]
    with monkeypatch.context() as patch:  # layers 1 and 2 wrote their saved values, then layer 3 fails
        fail_on_call(patch, layer_class, "__init__", 3, torch.OutOfMemoryError)
        refused(model, lambda: slimtune.load(model, directory), torch.OutOfMemoryError, "injected")
    ids = make_batch()
    assert torch.equal(logits(slimtune.load(model, directory), ids), logits(trained(method), ids))


def test_s2ft_checkpoint_with_a_duplicate_head_in_a_later_block_is_refused_before_any_write(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    source = trained("s2ft")
    directory = slimtune.save(source, tmp_path / "good")
    tensors = load_file(directory / "slimtune_model.safetensors")
    for key, what in [("model.layers.1.heads", "head"), ("model.layers.1.channels", "channel")]:
        bad = dict(tensors)
        units = bad[key].clone()
        units[-1] = units[0]
        bad[key] = units
        broken = tmp_path / f"dup-{what}"
        broken.mkdir()
        (broken / "slimtune_config.json").write_text((directory / "slimtune_config.json").read_text())
        save_file(bad, broken / "slimtune_model.safetensors")
        model = make_model("llama")
        load = lambda m=model, d=broken: slimtune.load(m, d)  # noqa: E731
        refused(model, load, ValueError, r"model\.layers\.1.*value twice")
        ids = make_batch()  # the good checkpoint on the same model afterwards: exactly the fine-tune
        assert torch.equal(logits(slimtune.load(model, directory), ids), logits(source, ids))


@pytest.mark.parametrize(
    "index, error, match",
    [
        (torch.tensor([1, 1, 2, 3]), ValueError, "value twice"),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), TypeError, "1-D int64"),
        (torch.tensor([1, 2, 3, -1]), ValueError, "out of range"),
    ],
)
def test_paca_checkpoint_indices_are_checked_before_any_write(index, error, match, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    directory = slimtune.save(trained("paca"), tmp_path / "good")
    tensors = load_file(directory / "slimtune_model.safetensors")
    tensors["model.layers.1.mlp.down_proj.index"] = index
    save_file(tensors, directory / "slimtune_model.safetensors")
    model = make_model("llama")
    where = r"model\.layers\.1\.mlp\.down_proj"
    refused(model, lambda: slimtune.load(model, directory), error, rf"{where}.*{match}")


@pytest.mark.parametrize("method", ["lora", "hydra"])
def test_a_failed_unmerge_leaves_the_merged_model_and_a_later_unmerge_works(method, monkeypatch) -> None:
    model, ids = trained(method), make_batch()
    patched = logits(model, ids)
    slimtune.merge(model)
    merged = logits(model, ids)
    with monkeypatch.context() as patch:
        fail_on_call(patch, CONFIGS[method][1], "__init__", 5, torch.OutOfMemoryError)
        refused(model, lambda: slimtune.unmerge(model), torch.OutOfMemoryError, "injected")
    assert torch.equal(logits(model, ids), merged)
    slimtune.unmerge(model)
    assert torch.equal(logits(model, ids), patched)


def _fail_second_write(patch) -> None:
    fail_on_call(patch, Transaction, "keep_entries", 2, torch.OutOfMemoryError)


def test_a_sparse_delta_failing_after_its_first_write_is_rolled_back(monkeypatch) -> None:
    model = make_model("llama")
    change = DeltaEntry(1, torch.tensor([0, 5]), torch.ones(64, 2).double())
    entries = {f"model.layers.{i}.mlp.down_proj.weight": change for i in range(2)}
    with monkeypatch.context() as patch:
        _fail_second_write(patch)
        refused(model, lambda: SparseDelta(entries).apply(model), torch.OutOfMemoryError, "injected")


def test_an_entry_diff_failing_after_its_first_write_is_rolled_back(monkeypatch) -> None:
    model = make_model("llama")
    one = DeltaEntry(ENTRIES, torch.tensor([0, 3]), torch.ones(2).double())
    diff = SparseDelta({"model.norm.weight": one, "model.layers.0.mlp.up_proj.weight": one})
    with monkeypatch.context() as patch:
        _fail_second_write(patch)
        refused(model, lambda: diff.apply(model), torch.OutOfMemoryError, "injected")


def test_rollback_restores_instance_attributes_and_training_modes() -> None:
    model = make_model("llama").train()
    before = snapshot(model)
    with pytest.raises(KeyError), Transaction(model):
        model.model.layers[0].mlp.forward = lambda x: x
        model.model.layers[1].eval()
        model.lm_head.weight.requires_grad_(False)
        model.model.set_submodule("norm", torch.nn.Identity())
        raise KeyError("boom")
    assert_untouched(model, before)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_failure_mid_merge_leaves_the_patched_model(method, monkeypatch) -> None:
    from slimtune.layers.lora import AdapterLinear
    from slimtune.layers.partial import PartialLinear

    model, ids = trained(method), make_batch()
    expected = logits(model, ids)
    merged_copy = logits(slimtune.merge(copy.deepcopy(model)), ids)
    owner, attribute = {
        "paca": (PartialLinear, "to_linear"),
        "s2ft": (Permutation, "apply"),  # the inverse co-permutations, after the layers were swapped
        "lora": (AdapterLinear, "prepare_merge"),
        "hydra": (AdapterLinear, "prepare_merge"),
    }[method]
    with monkeypatch.context() as patch:
        fail_on_call(patch, owner, attribute, 3, torch.OutOfMemoryError)
        refused(model, lambda: slimtune.merge(model), torch.OutOfMemoryError, "injected")
    assert torch.equal(logits(model, ids), expected)
    assert torch.equal(logits(slimtune.merge(model), ids), merged_copy)  # as if nothing had failed


class FailAt(torch.overrides.TorchFunctionMode):
    """Raise OutOfMemoryError at the n-th torch call made inside the block (count: how many ran)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.count = n, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if self.count == self.n:
            raise torch.OutOfMemoryError("injected failure")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merge_is_all_or_nothing_at_every_torch_call(method) -> None:
    """An out-of-memory error at any torch call inside `merge` leaves the patched model as it was
    (no layer half merged: a base weight holding its adapter beside the adapter layer would add it
    twice); the merge after the last failing point gives the fine-tune's outputs."""
    model, ids = trained(method), make_batch()
    expected = logits(model, ids)
    n = 1
    while True:
        before, injected = snapshot(model), FailAt(n)
        try:
            with torch.enable_grad(), injected:  # a failure inside no_grad's exit would leave grad mode off
                slimtune.merge(model)
        except torch.OutOfMemoryError:
            assert_untouched(model, before)
            assert torch.equal(logits(model, ids), expected), f"after a failure at torch call {n}"
            n += 1
            continue
        break
    assert n > 10  # the merge made torch calls, and each was a failure point
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("failing", ["write_text", "replace"])
@pytest.mark.parametrize("format", ["slimtune", "peft"])
def test_a_failed_save_over_a_checkpoint_leaves_the_previous_one_loadable(
    format, failing, tmp_path, monkeypatch
):
    """Saving an r=8 model over an r=4 checkpoint fails (a full disk on the config's write, or the
    second rename into place): the folder holds exactly the r=4 files, which load as before."""
    import errno
    import os

    from slimtune import files

    method, config = (
        ("paca", slimtune.PaCAConfig(r=8))
        if format == "slimtune"
        else ("lora", slimtune.LoRAConfig(r=8, alpha=8))
    )
    load = slimtune.load if format == "slimtune" else slimtune.load_peft
    old = trained(method)
    directory = slimtune.save(old, tmp_path / "checkpoint", format=format)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    new = slimtune.apply(make_model("llama"), config)
    with monkeypatch.context() as patch:
        owner, n = (files, 1) if failing == "write_text" else (os, 4)  # 2 staged writes, then 2 renames
        fail_on_call(patch, owner, failing, n, lambda message: OSError(errno.ENOSPC, message))
        with pytest.raises(OSError, match="injected"):
            slimtune.save(new, directory, format=format)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # and nothing left beside
    ids = make_batch()
    assert torch.equal(logits(load(make_model("llama"), directory), ids), logits(old, ids))
