"""S2FT: co-permutation preserves the function, blocks train in place, merge restores the layout."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
import transformers
from slimtune.layers.s2ft import S2FTLinear
from slimtune.registry import get as registered_method
from slimtune.state import patch_state
from test_refusals import refused
from tiny_models import make_batch, make_model
from torch import nn

FAMILIES = ["gemma", "llama", "mistral", "phi3", "qwen2", "qwen3"]
CONFIGS = {
    "heads+channels": slimtune.S2FTConfig(heads=0.5, channels=0.1, seed=1),
    "heads-only": slimtune.S2FTConfig(heads=1),
    "rows-too": slimtune.S2FTConfig(heads=3, channels=7, train_v_rows=True, train_gate_up_rows=True, seed=2),
    "weight-norm": slimtune.S2FTConfig(heads=2, channels=0.05, selection="weight-norm"),
}


def s2ft_layers(model: nn.Module) -> dict[str, S2FTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, S2FTLinear)}


def original_index(model: nn.Module, name: str) -> torch.Tensor:
    return registered_method("s2ft").glue.original_index(
        name, model.get_submodule(name), patch_state(model).extra
    )


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=lr, weight_decay=0.0)
    ids = make_batch(seed=11)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_copermutation_preserves_logits_and_merge_restores_layout(family, config):
    base = make_model(family)
    model = slimtune.apply(copy.deepcopy(base), config)
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    merged = slimtune.merge(model)
    for key, value in base.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), f"{key} differs after merge without training"


@pytest.mark.parametrize("family", FAMILIES)
def test_block_gradients_equal_dense_gradients(family):
    base = make_model(family)
    model = slimtune.apply(copy.deepcopy(base), CONFIGS["rows-too"])
    ref = copy.deepcopy(base)
    ids = make_batch()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    layers = s2ft_layers(model)
    assert layers
    for name, layer in layers.items():
        dense = ref.get_submodule(name).weight.grad
        expected = dense.index_select(layer.axis, original_index(model, name))
        torch.testing.assert_close(layer.s2ft_block.grad, expected, rtol=1e-4, atol=1e-6)


def test_defaults_train_only_o_and_down_columns_as_contiguous_blocks():
    model = slimtune.apply(make_model("llama"), slimtune.S2FTConfig(heads=0.5, channels=0.25))
    layers = s2ft_layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["down_proj", "o_proj"]
    head_dim = 64 // 4
    for name, layer in layers.items():
        size = 2 * head_dim if name.endswith("o_proj") else round(0.25 * 88)
        assert torch.equal(layer.s2ft_index, torch.arange(size)), "a contiguous block at the front"
        assert layer.axis == 1 and layer.s2ft_block.shape == (layer.out_features, size)


def test_column_block_saves_only_its_input_slice():
    model = slimtune.apply(make_model("llama"), slimtune.S2FTConfig(heads=1, channels=3))
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert tuple(saved[0].shape) == (10, 16)
    torch.testing.assert_close(saved[0], x.detach().reshape(10, -1)[:, :16], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_training_changes_only_selected_heads_and_channels(family):
    base = make_model(family)
    config = slimtune.S2FTConfig(heads=1, channels=5, seed=4)
    model = slimtune.apply(copy.deepcopy(base), config)
    losses = train(model, steps=20)
    assert losses[-1] < losses[0] - 0.1
    selections = patch_state(model).extra.selections
    merged = slimtune.merge(model)
    head_dim = base.config.head_dim if getattr(base.config, "head_dim", None) else 16
    merged_state, base_state = merged.state_dict(), base.state_dict()
    for key, value in base_state.items():
        changed = merged_state[key] != value
        if key.endswith("o_proj.weight") or key.endswith("down_proj.weight"):
            block = key.rsplit(".", 2)[0].rsplit(".", 1)[0]
            units = selections[f"{block}.heads" if "o_proj" in key else f"{block}.channels"]
            size = head_dim if "o_proj" in key else 1
            columns = (units[:, None] * size + torch.arange(size)).reshape(-1)
            expected = torch.zeros(value.shape[1], dtype=torch.bool)
            expected[columns] = True
            assert torch.equal(changed.any(dim=0), expected), (
                f"{key}: exactly the selected whole units change"
            )
        else:
            assert not changed.any(), f"{key} must stay bit-for-bit equal to the base"


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_save_load_merge_round_trip(family, tmp_path):
    base = make_model(family)
    model = slimtune.apply(copy.deepcopy(base), CONFIGS["rows-too"])
    train(model, steps=3)
    model.eval()
    ids = make_batch(seed=5)
    with torch.no_grad():
        trained = model(ids).logits
    slimtune.save(model, tmp_path)
    loaded = slimtune.load(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained, rtol=0, atol=0)
    merged = slimtune.merge(loaded)
    plain = type(base)(base.config).eval()
    plain.load_state_dict(merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_applies_reverts_saves_and_composes(dtype, tmp_path):
    base = make_model("llama", dtype=dtype)
    runs = []
    for seed in (1, 2):
        model = slimtune.apply(copy.deepcopy(base), slimtune.S2FTConfig(heads=1, channels=4, seed=seed))
        train(model, steps=3, lr=5e-2)
        diff = slimtune.delta(model)
        runs.append((diff, slimtune.merge(model)))
    (d1, merged1), (d2, _) = runs

    target = copy.deepcopy(base)
    d1.apply(target)
    for key, value in merged1.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), f"base + delta must equal the trained {key}"
    d1.revert(target)
    for key, value in base.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), f"revert must restore {key} exactly"

    reloaded = slimtune.load_delta(d1.save(tmp_path / "d1.safetensors"))
    assert reloaded.entries.keys() == d1.entries.keys()
    assert all(torch.equal(reloaded.entries[k].values, e.values) for k, e in d1.entries.items())

    both = d1 + d2
    one_by_one = d2.apply(d1.apply(copy.deepcopy(base)))
    fused = both.apply(copy.deepcopy(base))
    rtol = 1e-6 if dtype == torch.float32 else 1e-2  # fused sums round once, one by one twice
    for key, value in one_by_one.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=rtol, atol=1e-6)
    both.revert(fused)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=rtol, atol=1e-6)


def test_paca_delta_round_trip():
    base = make_model("mistral")
    model = slimtune.apply(copy.deepcopy(base), slimtune.PaCAConfig(r=3))
    train(model, steps=2)
    diff = slimtune.delta(model)
    target = diff.apply(copy.deepcopy(base))
    for key, value in slimtune.merge(model).state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


@pytest.mark.parametrize(
    "config, match",
    [
        (slimtune.S2FTConfig(heads=5), r"asks for 5 heads but block 'model.layers.0' has 4"),
        (slimtune.S2FTConfig(channels=89), r"asks for 89 FFN channels .* has 88"),
    ],
)
def test_more_units_than_exist_are_refused(config, match):
    model = make_model("qwen3")
    refused(model, lambda: slimtune.apply(model, config), ValueError, match)


def test_bad_models_and_deltas_are_refused():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32)
    gpt2 = transformers.GPT2LMHeadModel(config)
    refused(
        gpt2, lambda: slimtune.apply(gpt2, slimtune.S2FTConfig(heads=1)), ValueError, r"no attention module"
    )
    model = slimtune.apply(make_model("llama"), slimtune.S2FTConfig(channels=2))
    diff = slimtune.delta(model)
    narrower = make_model("llama", intermediate_size=40)
    refused(narrower, lambda: diff.apply(narrower), ValueError, r"down_proj.*another model")
    refused(model, lambda: diff.apply(model), ValueError, r"plain base model")


@pytest.mark.gpu
def test_bf16_cuda_block_gradients():
    base = make_model("qwen3", dtype=torch.bfloat16).cuda()
    model = slimtune.apply(copy.deepcopy(base), CONFIGS["rows-too"])
    ref = copy.deepcopy(base)
    ids = make_batch(batch=4, seq=64).cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=2e-2, atol=2e-2)
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for name, layer in s2ft_layers(model).items():
        dense = ref.get_submodule(name).weight.grad.index_select(
            layer.axis, original_index(model, name).cuda()
        )
        err = (layer.s2ft_block.grad.float() - dense.float()).norm() / dense.float().norm()
        assert err < 2e-2, name


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, r"heads > 0 or channels > 0"),
        ({"heads": 0, "channels": 0.0}, ValueError, r"heads > 0 or channels > 0"),
        ({"heads": 1.5}, ValueError, r"fraction > 1"),
        ({"channels": -2}, ValueError, r"must not be negative"),
        ({"heads": "2"}, TypeError, r"int count or a float fraction"),
        ({"channels": 3, "selection": "largest"}, ValueError, r"'random' or 'weight-norm'"),
        ({"channels": 3, "train_v_rows": True}, ValueError, r"train_v_rows needs heads > 0"),
    ],
)
def test_bad_configs_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        slimtune.S2FTConfig(**kwargs)


def test_fractions_round_to_at_least_one_unit():
    model = slimtune.apply(make_model("llama"), slimtune.S2FTConfig(heads=0.01, channels=0.001))
    o_proj, down_proj = model.model.layers[0].self_attn.o_proj, model.model.layers[0].mlp.down_proj
    assert o_proj.r == 16 and down_proj.r == 1  # one head of head_dim 16, one channel
