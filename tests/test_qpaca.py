"""QPaCA: PaCA on a 4-bit base (bitsandbytes NF4 and FP4, with and without double quantization;
torchao NF4).

The layer against a float64 dense reference built from the dequantized weight with the trained
columns written in (output, input gradient, column gradient); a tiny Llama quantized in place
trains with the trajectory of PaCA on its dequantized dense twin; checkpoints load across the two;
merge gives the effective dense weights; delta, lean and the refusals."""

from __future__ import annotations

import pytest
import slimtune
import torch
from quantize import FORMATS, dense_twin, quantize, quantize_linear
from slimtune.layers.qpaca import QPaCALinear
from test_refusals import refused
from tiny_models import make_batch, make_model, sharded_steps
from torch import nn


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_layer_matches_the_float64_dense_reference(fmt, dtype, tol, scale) -> None:
    generator = torch.Generator().manual_seed(3)
    dense = nn.Linear(96, 40, bias=True).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(40, 96, generator=generator))
        dense.bias.copy_(torch.randn(40, generator=generator))
    base = quantize_linear(dense, fmt)
    index = torch.tensor([1, 7, 8, 50, 95])
    layer = QPaCALinear(base, index, scale)
    with torch.no_grad():
        layer.paca_columns.add_(torch.randn(40, 5, generator=generator))
    x = torch.randn(2, 3, 96, generator=generator).to(dtype).requires_grad_(True)
    dy = torch.randn(2, 3, 40, generator=generator).to(dtype)
    y = layer(x)
    y.backward(dy)
    weight = slimtune.quantized.dequantized(base).double()
    weight[:, index] = scale * layer.paca_columns.detach().double()
    x64, dy64 = x.detach().double(), dy.double()
    expected = x64 @ weight.T + base.bias.detach().double()
    column_grad = scale * torch.einsum("bto,bti->oi", dy64, x64[..., index])
    for got, want in [(y, expected), (x.grad, dy64 @ weight), (layer.paca_columns.grad, column_grad)]:
        # within `tol` of each tensor's own scale (float32 sums round at about 1e-7 of it)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))
    assert base.weight.grad is None and layer.paca_columns.dtype == torch.float32


def _pair(fmt: str = "bnb-nf4") -> tuple[nn.Module, nn.Module]:
    """A tiny Llama quantized in place, and PaCA's dense twin of it; both patched with PaCA r=4."""
    quantized = quantize(make_model("llama"), fmt)
    twin = dense_twin(quantized)
    config = slimtune.PaCAConfig(r=4)
    return slimtune.apply(quantized, config), slimtune.apply(twin, config)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_llama_trains_as_paca_on_its_dequantized_twin(fmt) -> None:
    quantized, twin = _pair(fmt)
    assert any(isinstance(m, QPaCALinear) for m in quantized.modules())
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            quantized(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    mine, theirs = sharded_steps(quantized, _adamw(quantized), 0, 1), sharded_steps(twin, _adamw(twin), 0, 1)
    assert mine == pytest.approx(theirs, rel=1e-6) and mine[-1] < mine[0] + 0.05
    for name, layer in slimtune.state.patched_layers(quantized).items():
        torch.testing.assert_close(
            layer.paca_columns, twin.get_submodule(name).paca_columns, rtol=1e-5, atol=1e-6
        )
        assert slimtune.quantized.is_4bit(layer.base)


@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
def test_checkpoints_load_across_the_quantized_model_and_its_dense_twin(tmp_path, fmt) -> None:
    quantized, _ = _pair(fmt)
    sharded_steps(quantized, _adamw(quantized), 0, 1)
    slimtune.save(quantized, tmp_path / "q")
    fresh_twin = dense_twin(quantize(make_model("llama"), fmt))
    slimtune.load(fresh_twin, tmp_path / "q")
    ids = make_batch()
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
        torch.testing.assert_close(fresh_twin(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    slimtune.save(fresh_twin, tmp_path / "dense")
    again = slimtune.load(quantize(make_model("llama"), fmt), tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, QPaCALinear) for m in again.modules())


@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
def test_merge_gives_the_effective_dense_weights_and_delta_fits_the_dense_base(fmt) -> None:
    quantized, _ = _pair(fmt)
    base = dense_twin(quantize(make_model("llama"), fmt))
    sharded_steps(quantized, _adamw(quantized), 0, 1)
    delta = slimtune.delta(quantized)
    ids = make_batch()
    with torch.no_grad():
        before = quantized(input_ids=ids).logits
    merged = slimtune.merge(quantized)
    assert not any(slimtune.quantized.is_4bit(m) or isinstance(m, QPaCALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    delta.apply(base)
    for name, parameter in merged.named_parameters():
        torch.testing.assert_close(base.get_parameter(name), parameter, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
def test_lean_mode_trains_a_quantized_model(fmt) -> None:
    quantized, _ = _pair(fmt)
    with pytest.warns(UserWarning, match="LlamaMLP: projections not plain or partial linears"):
        slimtune.lean(quantized)  # norms and head go lean; the MLPs of 4-bit linears keep their path
    losses = sharded_steps(quantized, _adamw(quantized), 0, 1)
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize(
    ("fmt", "described"),
    [("bnb-nf4", r"bitsandbytes Linear4bit \(nf4\)"), ("torchao-nf4", r"torchao NF4 linear")],
)
def test_other_methods_and_sharding_engines_are_refused_by_name(fmt, described) -> None:
    model = quantize(make_model("llama"), fmt)
    refused(
        model,
        lambda: slimtune.apply(model, slimtune.S2FTConfig(heads=1, channels=8)),
        ValueError,
        described + ".*: PaCA, LoRA and Hydra train on 4-bit bases",
    )
    slimtune.apply(model, slimtune.PaCAConfig(r=4))
    for number, parameter in enumerate(model.parameters()):
        parameter.ds_id = number  # what DeepSpeed ZeRO-3 marks
    with pytest.raises(RuntimeError, match=r"has 4-bit bases.*DeepSpeed ZeRO-3"):
        model(input_ids=make_batch())


def test_a_weight_of_an_unknown_tensor_subclass_is_refused_by_name() -> None:
    """A linear whose weight is a tensor subclass slimtune does not know (another quantization
    library's, say) is refused, not patched as if it were a plain float weight."""

    class Packed(torch.Tensor):
        pass

    model = make_model("llama")
    linear = model.model.layers[0].mlp.up_proj
    linear.weight = nn.Parameter(linear.weight.detach().as_subclass(Packed), requires_grad=False)
    refused(
        model,
        lambda: slimtune.apply(model, slimtune.PaCAConfig(r=4)),
        ValueError,
        r"module 'model.layers.0.mlp.up_proj' holds its weight as a .*Packed \(a tensor subclass",
    )


def test_partial_adamw_steps_the_columns_as_torch_adamw_does() -> None:
    """PartialAdamW binds only dense partial layers: QPaCA's columns take its plain fused update."""
    ours, theirs = _pair()[0], _pair()[0]
    mine = sharded_steps(ours, slimtune.PartialAdamW(ours, lr=1e-2, weight_decay=1e-2), 0, 1)
    reference = torch.optim.AdamW(
        [p for p in theirs.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2
    )
    assert mine == pytest.approx(sharded_steps(theirs, reference, 0, 1), rel=1e-6)


def test_a_model_loaded_with_bitsandbytes_config_trains_as_its_dense_twin(tmp_path) -> None:
    """`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` (on CPU):
    apply just works, and the run is PaCA's on the dequantized weights."""
    import transformers

    make_model("llama").save_pretrained(tmp_path)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=config, device_map="cpu"
    )
    twin = slimtune.apply(dense_twin(loaded), slimtune.PaCAConfig(r=4))
    model = slimtune.apply(loaded, slimtune.PaCAConfig(r=4))
    assert sum(isinstance(m, QPaCALinear) for m in model.modules()) == 14  # 7 linears in each of 2 blocks
    ids = make_batch()
    with torch.no_grad():  # evaluation (eval mode, no gradients) computes as training does
        torch.testing.assert_close(
            model(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    mine, theirs = sharded_steps(model, _adamw(model), 0, 1), sharded_steps(twin, _adamw(twin), 0, 1)
    assert mine == pytest.approx(theirs, rel=1e-6)
    slimtune.merge(model)  # the 4-bit weights were never repacked for bitsandbytes' CPU inference
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_a_weight_repacked_for_cpu_inference_is_refused_by_name() -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on an eval-mode forward without
    gradients (on CPUs with AVX512-BF16); its layout is then no longer the quantized one."""
    model = quantize(make_model("llama"))
    layer = model.model.layers[0].self_attn.q_proj.eval()
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the quantized layout")
    # (Not through `refused`: its state_dict snapshot would make bitsandbytes unpack the weight.)
    with pytest.raises(ValueError, match="repacked its 4-bit weight"):
        slimtune.apply(model, slimtune.PaCAConfig(r=4))
    assert slimtune.state.patch_state(model) is None and slimtune.quantized.is_4bit(layer)
