"""Intruder dimensions: none for a small full-rank perturbation, some for a LoRA-like update that adds
new high singular directions, none for unchanged matrices of flat spectra."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
from slimtune.diagnostics import intruder_dimensions
from tiny_models import make_model


def test_a_small_full_rank_perturbation_has_no_intruders() -> None:
    base = make_model("llama")
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in slimtune.targets.match_targets(tuned, "all-linear"):
            module.weight.add_(1e-4 * torch.randn(module.weight.shape, generator=generator))
    counts = intruder_dimensions(base, tuned, k=8)
    assert counts and set(counts.values()) == {0}


def test_a_low_rank_update_with_new_high_directions_has_intruders() -> None:
    base = make_model("llama")
    tuned = copy.deepcopy(base)
    name = "model.layers.1.mlp.down_proj"
    weight = tuned.get_submodule(name).weight
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(weight.shape[0], 2, generator=generator)
    b = torch.randn(2, weight.shape[1], generator=generator)
    top = float(torch.linalg.matrix_norm(weight, ord=2))
    with torch.no_grad():  # two directions, each well above the pre-trained top singular value
        weight.add_(3 * top * torch.linalg.qr(a).Q @ torch.linalg.qr(b.t()).Q.t())
    counts = intruder_dimensions(base, tuned, k=4, threshold=0.6)
    assert counts[name] >= 1
    assert all(count == 0 for other, count in counts.items() if other != name)


def test_matrices_with_flat_spectra_have_no_intruders_when_unchanged() -> None:
    # Random-init (and pre-trained) weights have slowly decaying singular values: a randomized
    # top-k SVD (the first version) rotated their top vectors and counted most as intruders.
    base = make_model("llama", hidden_size=256, intermediate_size=320, num_attention_heads=4)
    counts = intruder_dimensions(base, copy.deepcopy(base), k=10)
    assert counts and set(counts.values()) == {0}


def test_bad_arguments_and_patched_models_are_refused() -> None:
    base = make_model("llama")
    with pytest.raises(ValueError, match="k >= 1"):
        intruder_dimensions(base, base, k=0)
    patched = slimtune.apply(
        copy.deepcopy(base), slimtune.LoRAConfig(r=2, alpha=4, target_modules=["q_proj"])
    )
    counts = intruder_dimensions(base, slimtune.merge(patched), k=2)
    assert counts  # a merged model compares like any plain one
