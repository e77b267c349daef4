"""Float32 masters for PaCA/S2FT in half precision, and PaCA's alpha reparametrisation.

In bf16 a small Adam step rounds away when written straight into the bf16 weight; with a float32
master the optimizer steps the float32 copy and the weight gets its rounded value, so the update
follows the float32 run."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
from slimtune.layers.partial import PartialLinear
from tiny_models import make_batch, make_model

LR, STEPS = 1e-5, 20


def _partial(model) -> dict[str, PartialLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PartialLinear)}


def _train(model, optimizer_class, steps=STEPS, lr=LR, eps=1e-8) -> None:
    ids = make_batch(seed=5)
    optimizer = optimizer_class(slimtune.trainable_parameters(model), lr=lr, eps=eps, weight_decay=0.0)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _updates(model, base) -> dict[str, torch.Tensor]:
    """The change of every trained entry, as the optimizer holds it (the master, or the weight's own
    half-precision entries without one), in weight units and float64, by layer."""
    out = {}
    for name, layer in _partial(model).items():
        now = layer.effective().detach().double()
        before = base.get_submodule(name).weight.detach().double().index_select(layer.axis, layer.index.cpu())
        out[name] = now - before
    return out


CONFIGS = {
    "paca": lambda master: slimtune.PaCAConfig(r=8, seed=1, fp32_master=master),
    "s2ft": lambda master: slimtune.S2FTConfig(heads=2, channels=16, seed=1, fp32_master=master),
}


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, slimtune.PartialAdamW])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_bf16_with_fp32_masters_follows_the_fp32_run_at_lr_1e_5(method, optimizer) -> None:
    base = make_model("llama", dtype=torch.bfloat16).float()  # bf16-representable start, in fp32
    reference = slimtune.apply(copy.deepcopy(base), CONFIGS[method](True))
    _train(reference, optimizer)
    expected = _updates(reference, base)
    results = {}
    for master in (True, False):
        model = slimtune.apply(copy.deepcopy(base).to(torch.bfloat16), CONFIGS[method](master))
        assert all(layer.master == master for layer in _partial(model).values())
        _train(model, optimizer)
        updates = _updates(model, base)
        change = torch.cat([u.flatten() for u in updates.values()])
        wanted = torch.cat([expected[n].flatten() for n in updates])
        results[master] = {
            "moved": float((change != 0).double().mean()),
            "relative error": float((change - wanted).norm() / wanted.norm()),
            "norm ratio": float(change.norm() / wanted.norm()),
        }
    # With masters the bf16 update is the fp32 one up to bf16 rounding of the final weight; without,
    # most small steps round away (the failure the masters exist for).
    assert results[True]["relative error"] < 0.1, results
    assert 0.9 < results[True]["norm ratio"] < 1.1, results
    assert results[True]["moved"] > 0.9, results
    assert results[False]["relative error"] > 3 * results[True]["relative error"], results


def test_masters_are_float32_only_for_half_precision_weights_and_round_trip(tmp_path) -> None:
    fp32 = slimtune.apply(make_model("llama"), slimtune.PaCAConfig(r=4))
    assert not any(layer.master for layer in _partial(fp32).values())
    model = slimtune.apply(make_model("llama", dtype=torch.bfloat16), slimtune.PaCAConfig(r=4))
    assert all(layer.trained.dtype == torch.float32 for layer in _partial(model).values())
    with torch.no_grad():
        for layer in _partial(model).values():
            layer.trained.add_(1e-4)  # below bf16 resolution for most entries
    ids = make_batch()
    directory = slimtune.save(model, tmp_path / "bf16")
    reloaded = slimtune.load(make_model("llama", dtype=torch.bfloat16), directory)
    for name, layer in _partial(reloaded).items():
        assert torch.equal(layer.trained, _partial(model)[name].trained)  # the masters, not rounded
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("alpha", [None, 64.0])
def test_paca_alpha_makes_each_adam_step_alpha_over_r_larger(alpha) -> None:
    """The authors' reparametrisation: trained = W[:, idx] / (alpha / r), weight = scale * trained."""
    r, base = 16, make_model("llama")
    model = slimtune.apply(copy.deepcopy(base), slimtune.PaCAConfig(r=r, alpha=alpha))
    plain = slimtune.apply(copy.deepcopy(base), slimtune.PaCAConfig(r=r))
    ids = make_batch()
    with torch.no_grad():  # same function at init
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    _train(model, torch.optim.AdamW, steps=1, lr=1e-4, eps=1e-14)  # one step: the same gradient
    _train(plain, torch.optim.AdamW, steps=1, lr=1e-4, eps=1e-14)
    scale = 1.0 if alpha is None else alpha / r
    for name, change in _updates(model, base).items():
        # equal up to Adam's eps, which weighs on entries whose gradient is near eps
        torch.testing.assert_close(
            change, scale * _updates(plain, base)[name], rtol=1e-3, atol=0.1 * scale * 1e-4
        )


def test_paca_alpha_checkpoint_and_delta_are_in_weight_units(tmp_path) -> None:
    base = make_model("llama")
    model = slimtune.apply(copy.deepcopy(base), slimtune.PaCAConfig(r=8, alpha=32.0))
    _train(model, torch.optim.AdamW, steps=2, lr=1e-3)
    ids = make_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = slimtune.load(copy.deepcopy(base), slimtune.save(model, tmp_path / "a"))
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        delta = slimtune.delta(model)
        torch.testing.assert_close(delta.apply(copy.deepcopy(base))(input_ids=ids).logits, expected)


def test_paca_alpha_is_checked() -> None:
    for bad in (0, -1.0, float("nan"), True, "4"):
        with pytest.raises(ValueError, match=r"PaCAConfig\.alpha"):
            slimtune.PaCAConfig(r=4, alpha=bad)
    with pytest.raises(TypeError, match="fp32_master must be True or False"):
        slimtune.PaCAConfig(r=4, fp32_master="yes")
