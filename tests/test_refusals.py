"""Every refused apply/load raises a clear error and leaves the model exactly as it was."""

from __future__ import annotations

import re

import pytest
import slimtune
import torch
import transformers
from tiny_models import make_model
from torch import nn


def _copy(value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A tensor's data, exactly; a wrapper subclass whose inner tensors are all tensors (torchao's
    NF4Tensor) as those (its own clone re-quantizes)."""
    flatten = getattr(value, "__tensor_flatten__", None) if type(value) is not torch.Tensor else None
    inner = [getattr(value, name) for name in flatten()[0]] if flatten is not None else []
    if not inner or not all(isinstance(t, torch.Tensor) for t in inner):  # plain, or a DTensor (its mesh)
        return (value.detach().clone(),)
    return tuple(t.detach().clone() for t in inner)


def snapshot(model: nn.Module) -> dict:
    return {
        "types": {n: type(m) for n, m in model.named_modules()},
        "values": {k: _copy(v) for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        # instance attributes of every module (a forward override, a stand-in save_pretrained) and modes
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["attrs"] == before["attrs"]
    assert after["training"] == before["training"]
    assert after["values"].keys() == before["values"].keys()
    for key, value in before["values"].items():
        assert len(after["values"][key]) == len(value), key
        assert all(map(torch.equal, after["values"][key], value)), key


def refused(model: nn.Module, call, error: type[Exception], match: str) -> None:
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call()
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": 0}, ValueError, r"r must be >= 1"),
        ({"r": -2}, ValueError, r"r must be >= 1"),
        ({"r": 2.5}, TypeError, r"r must be an int"),
        ({"r": 2, "target_modules": []}, ValueError, r"empty"),
        ({"r": 2, "target_modules": 3}, TypeError, r"target_modules"),
    ],
)
def test_bad_configs_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        slimtune.PaCAConfig(**kwargs)


def test_r_larger_than_a_layer_is_refused_naming_it():
    model = make_model("llama")
    config = slimtune.PaCAConfig(r=80)  # hidden 64 < 80 <= intermediate 88: only some layers are too narrow
    refused(
        model,
        lambda: slimtune.apply(model, config),
        ValueError,
        r"r=80 exceeds the 64 input columns of 'model",
    )


@pytest.mark.parametrize(
    "targets, match",
    [
        (["nonexistent_proj"], r"match no module of LlamaForCausalLM.*q_proj"),
        (["q_proj", "nonexistent_proj"], r"\['nonexistent_proj'\] match no module"),
        ("model\\.layers\\.9\\..*", r"regex .* match no module"),
        ("([", r"not a valid regex"),
    ],
)
def test_patterns_matching_nothing_are_refused(targets, match):
    model = make_model("llama")
    refused(
        model,
        lambda: slimtune.apply(model, slimtune.PaCAConfig(r=2, target_modules=targets)),
        ValueError,
        match,
    )


def test_suffix_and_regex_targets_select_exactly_those_modules():
    model = slimtune.apply(
        make_model("llama"), slimtune.PaCAConfig(r=2, target_modules=["q_proj", "down_proj"])
    )
    names = {n for n, m in model.named_modules() if isinstance(m, slimtune.layers.PaCALinear)}
    assert names == {f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.q_proj", "mlp.down_proj")}
    model = slimtune.apply(
        make_model("llama"), slimtune.PaCAConfig(r=2, target_modules=r".*\.1\.mlp\.up_proj")
    )
    names = {n for n, m in model.named_modules() if isinstance(m, slimtune.layers.PaCALinear)}
    assert names == {"model.layers.1.mlp.up_proj"}


def test_patching_twice_is_refused():
    model = slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=2))
    refused(
        model, lambda: slimtune.apply(model, slimtune.PaCAConfig(r=3)), ValueError, r"already patched.*merge"
    )


def test_wrong_types_are_refused():
    model = make_model("llama")
    refused(model, lambda: slimtune.apply(model, {"r": 2}), TypeError, r"slimtune config")
    with pytest.raises(TypeError, match=r"torch.nn.Module"):
        slimtune.apply("not a model", slimtune.PaCAConfig(r=2))
    refused(model, lambda: slimtune.trainable_parameters(model), ValueError, r"not patched")


class QuantLinear(nn.Linear):
    """Stands for a quantized linear (bitsandbytes and friends subclass nn.Linear)."""


def test_unknown_linear_subclass_is_refused():
    model = make_model("llama")
    model.model.layers[1].mlp.up_proj = QuantLinear(64, 88, bias=False)
    refused(
        model,
        lambda: slimtune.apply(model, slimtune.PaCAConfig(r=2)),
        ValueError,
        r"'model.layers.1.mlp.up_proj' of type .*QuantLinear is a subclass of nn.Linear",
    )


def test_integer_weights_are_refused():
    model = make_model("llama")
    linear = model.model.layers[0].self_attn.k_proj
    linear.weight = nn.Parameter(torch.zeros(linear.weight.shape, dtype=torch.int8), requires_grad=False)
    refused(
        model,
        lambda: slimtune.apply(model, slimtune.PaCAConfig(r=2)),
        ValueError,
        r"k_proj.*int8.*dequantize",
    )


def test_gpt2_conv1d_is_refused_by_name():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    refused(
        model, lambda: slimtune.apply(model, slimtune.PaCAConfig(r=2)), ValueError, r"transformer.h.0.*Conv1D"
    )


def test_checkpoint_for_another_model_is_refused(tmp_path):
    trained = slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=3))
    slimtune.save(trained, tmp_path)
    narrower = make_model("llama", intermediate_size=40)
    refused(narrower, lambda: slimtune.load(narrower, tmp_path), ValueError, r"mlp.gate_proj.*88x64.*40x64")
    other_family = make_model("phi3")
    refused(
        other_family, lambda: slimtune.load(other_family, tmp_path), ValueError, r"q_proj.*does not exist"
    )
    already = slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=3))
    refused(already, lambda: slimtune.load(already, tmp_path), ValueError, r"already patched")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        slimtune.load(make_model("llama"), tmp_path / "nowhere")


def test_merge_of_unpatched_model_is_refused():
    model = make_model("llama")
    refused(model, lambda: slimtune.merge(model), ValueError, r"not patched")
