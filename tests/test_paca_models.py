"""PaCA on tiny random-init Hugging Face models of several families, against dense references."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
from slimtune.layers import PaCALinear
from tiny_models import FAMILIES, make_batch, make_model
from torch import nn

FAMILY_NAMES = sorted(FAMILIES)
R = 5


def patched(family: str, r: int = R, fp32_master: bool = True, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(base, patched copy) of a tiny model of `family`."""
    base = make_model(family, **kwargs)
    model = slimtune.apply(copy.deepcopy(base), slimtune.PaCAConfig(r=r, seed=3, fp32_master=fp32_master))
    return base, model


def paca_layers(model: nn.Module) -> dict[str, PaCALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PaCALinear)}


def dense_reference(base: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the base whose targeted linear weights train densely (for reference gradients)."""
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    for name in paca_layers(model):
        ref.get_submodule(name).weight.requires_grad_(True)
    return ref


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_apply_preserves_logits_and_targets_block_linears(family):
    base, model = patched(family)
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    layers = paca_layers(model)
    expected = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(layers) == sorted(expected)
    assert isinstance(model.lm_head, nn.Linear) and type(model.lm_head) is nn.Linear
    trainable = slimtune.trainable_parameters(model)
    assert {id(p) for p in trainable} == {id(layer.paca_columns) for layer in layers.values()}
    for layer in layers.values():
        assert not layer.weight.requires_grad
        assert layer.paca_columns.shape == (layer.out_features, R)
        torch.testing.assert_close(layer.paca_columns, layer.weight[:, layer.paca_index], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_column_gradients_equal_dense_gradients(family):
    base, model = patched(family)
    ref = dense_reference(base, model)
    ids = make_batch()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for name, layer in paca_layers(model).items():
        dense = ref.get_submodule(name).weight.grad
        torch.testing.assert_close(layer.paca_columns.grad, dense[:, layer.paca_index], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if "paca_columns" not in n)


def test_indices_are_reproducible_and_seed_dependent():
    a = paca_layers(slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=R, seed=1)))
    b = paca_layers(slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=R, seed=1)))
    c = paca_layers(slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=R, seed=2)))
    assert all(torch.equal(a[n].paca_index, b[n].paca_index) for n in a)
    assert any(not torch.equal(a[n].paca_index, c[n].paca_index) for n in a)
    assert len({tuple(layer.paca_index.tolist()) for layer in a.values()}) > 1, (
        "layers must draw their own columns"
    )


def train_against_masked_dense(model, ref, steps, accumulate=1, lr=1e-2):
    """Train `model` (PaCA) and `ref` (dense grads masked to the trained columns) side by side."""
    layers = paca_layers(model)
    masks = {n: torch.zeros_like(layer.weight, dtype=torch.bool) for n, layer in layers.items()}
    for n, layer in layers.items():
        masks[n][:, layer.paca_index] = True
    ref_weights = {n: ref.get_submodule(n).weight for n in layers}
    opt = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=lr, weight_decay=0.0)
    ref_opt = torch.optim.AdamW(ref_weights.values(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        for micro in range(accumulate):
            ids = make_batch(seed=100 + micro)  # a fixed set of micro-batches: a learnable target
            (model(ids, labels=ids).loss / accumulate).backward()
            (ref(ids, labels=ids).loss / accumulate).backward()
        for n, w in ref_weights.items():
            w.grad.mul_(masks[n])
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ids = make_batch(seed=100)
            losses.append(model(ids, labels=ids).loss.item())
            torch.testing.assert_close(losses[-1], ref(ids, labels=ids).loss.item(), rtol=1e-4, atol=1e-5)
    return losses


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adamw_training_follows_masked_dense_reference(family):
    base, model = patched(family)
    ref = dense_reference(base, model)
    model.train()
    ref.train()
    losses = train_against_masked_dense(model, ref, steps=30)
    assert losses[-1] < losses[0] - 0.1
    for name, layer in paca_layers(model).items():
        ref_weight = ref.get_submodule(name).weight
        torch.testing.assert_close(layer.weight, ref_weight, rtol=1e-4, atol=1e-5)
        untouched = torch.ones(layer.in_features, dtype=torch.bool)
        untouched[layer.paca_index] = False
        base_weight = base.get_submodule(name).weight
        assert torch.equal(layer.weight[:, untouched], base_weight[:, untouched])
        assert not torch.equal(layer.weight[:, layer.paca_index], base_weight[:, layer.paca_index])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradient_checkpointing_and_accumulation_follow_reference(family):
    base, model = patched(family)
    ref = dense_reference(base, model)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    ref.train()
    losses = train_against_masked_dense(model, ref, steps=6, accumulate=3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.5),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
        lambda ps: slimtune.PartialAdamW(ps, lr=1e-2),
    ],
    ids=["sgd", "adamw", "adamw-foreach", "adamw-fused", "adagrad", "partial-adamw"],
)
def test_forward_never_sees_stale_columns(make_optimizer):
    _, model = patched("llama")
    opt = make_optimizer(slimtune.trainable_parameters(model))
    for step in range(3):
        ids = make_batch(seed=step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        # The forward must use exactly the current columns: compare against a merged copy.
        merged = slimtune.merge(copy.deepcopy(model))
        for name, layer in paca_layers(model).items():
            expected = layer.paca_columns.detach()
            torch.testing.assert_close(merged.get_submodule(name).weight[:, layer.paca_index], expected)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=0, atol=0)


def test_manual_in_place_update_is_seen_by_the_next_forward():
    _, model = patched("llama")
    layer = next(iter(paca_layers(model).values()))
    with torch.no_grad():
        layer.paca_columns.mul_(-3.0)
        x = torch.randn(2, layer.in_features)
        torch.testing.assert_close(layer(x), x @ layer.weight.t())
    assert torch.equal(layer.weight[:, layer.paca_index], layer.paca_columns)


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2"])
def test_save_load_and_merge_round_trip(family, tmp_path):
    base, model = patched(family)
    model.train()
    opt = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=1e-2)
    for step in range(3):
        ids = make_batch(seed=step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids = make_batch(seed=42)
    with torch.no_grad():
        trained_logits = model(ids).logits
    slimtune.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "slimtune_config.json",
        "slimtune_model.safetensors",
    ]

    loaded = slimtune.load(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained_logits, rtol=0, atol=0)
    assert len(slimtune.trainable_parameters(loaded)) == len(paca_layers(model))

    merged = slimtune.merge(model)
    assert not paca_layers(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    assert all(p.requires_grad for p in merged.parameters()), "merge restores the flags apply found"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained_logits, rtol=0, atol=0)
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained_logits, rtol=0, atol=0)


def test_generate_uses_trained_columns():
    _, model = patched("llama")
    with torch.no_grad():
        for layer in paca_layers(model).values():
            layer.paca_columns.mul_(1.5)
    prompt = make_batch(batch=1, seq=4)
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    merged = slimtune.merge(copy.deepcopy(model))
    assert torch.equal(generated, merged.generate(prompt, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("fp32_master", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_train(dtype, fp32_master):
    base, model = patched("llama", dtype=dtype, fp32_master=fp32_master)
    ref = dense_reference(base, model)
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for name, layer in paca_layers(model).items():
        assert layer.paca_columns.grad.dtype == (torch.float32 if fp32_master else dtype)
        dense = ref.get_submodule(name).weight.grad[:, layer.paca_index]
        torch.testing.assert_close(
            layer.paca_columns.grad, dense.to(layer.paca_columns.dtype), rtol=2e-2, atol=2e-3
        )


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_bf16_cuda_model_gradients_and_partial_adamw(family):
    base = make_model(family, dtype=torch.bfloat16).cuda()
    model = slimtune.apply(copy.deepcopy(base), slimtune.PaCAConfig(r=R, seed=3))
    ref = dense_reference(base, model)
    ids = make_batch(batch=4, seq=64).cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for name, layer in paca_layers(model).items():
        dense = ref.get_submodule(name).weight.grad[:, layer.paca_index].float()
        err = (layer.paca_columns.grad.float() - dense).norm() / dense.norm()
        assert err < 2e-2, name
    # The fused CUDA step keeps the dense weight equal to the trained columns.
    opt = slimtune.PartialAdamW(slimtune.trainable_parameters(model), lr=1e-3)
    for _ in range(3):
        opt.step()
        for layer in paca_layers(model).values():
            assert torch.equal(layer.weight[:, layer.paca_index], layer.paca_columns)
        model(ids, labels=ids).loss.backward()
