"""QLoRA: LoRA on a 4-bit base (bitsandbytes NF4/FP4, torchao NF4). The layer against a float64
reference built from the dequantized weight; a tiny Llama quantized in place (or loaded with
BitsAndBytesConfig) trains with the trajectory of LoRA on its dequantized dense twin; checkpoints and
PEFT adapters load across the two; merge gives dense weights, unmerge and CorDA are refused by name;
the layers compile with the eager numbers."""

from __future__ import annotations

import pytest
import slimtune
import torch
import torch.distributed as dist
from quantize import FORMATS, dense_twin, quantize, quantize_linear
from slimtune.layers.qlora import QHydraLinear, QLoRALinear
from test_refusals import refused
from tiny_models import make_batch, make_model, run_two_processes, sharded_steps
from torch import nn

LORA = slimtune.LoRAConfig(r=4, alpha=8, fp32_master=True)
HYDRA = slimtune.HydraConfig(r_parallel=2, r_sequential=3, alpha=4, fp32_master=True)
ADAPTERS = {"qlora": LORA, "qhydra": HYDRA}
# Trained adapters after 5 AdamW steps at lr 1e-2: Adam turns the rounding of near-zero gradients
# (B starts at 0) into steps of up to lr in a few entries; the losses agree to 1e-6 (measured 4e-5
# in 1 of 256 entries for torchao NF4 bases, the 4-bit and dense products rounding differently).
ADAM_ATOL = 1e-4
HYDRA_TENSORS = ("parallel_A", "parallel_B", "sequential_A", "sequential_B")


PRECISIONS = pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3)], ids=["fp32", "bf16"]
)


def against_float64(layer: nn.Module, trained_names, reference, dtype: torch.dtype, tol: float) -> None:
    """The layer's output, input gradient and every trained tensor's gradient against `reference(x,
    w, bias, *trained)` run in float64 autograd on the dequantized weight; each within `tol` of its
    own scale (float32 sums round at about 1e-7 of it)."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, layer.in_features, generator=generator).to(dtype).requires_grad_(True)
    dy = torch.randn(2, 3, layer.out_features, generator=generator).to(dtype)
    layer(x).backward(dy)
    inputs = [x, *(getattr(layer, name) for name in trained_names)]
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    w, bias = slimtune.quantized.dequantized(layer.base).double(), layer.base.bias.detach().double()
    expected = reference(exact[0], w, bias, *exact[1:])
    expected.backward(dy.double())
    pairs = [(layer(x.detach()), expected.detach())] + [
        (t.grad, e.grad) for t, e in zip(inputs, exact, strict=True)
    ]
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))
    assert all(t.dtype == torch.float32 for t in inputs[1:]) and layer.base.weight.grad is None


def adapter_layer(kind: type, fmt: str, dtype: torch.dtype, *sizes) -> nn.Module:
    """A `kind` layer on a 4-bit 96 -> 40 base, float32 adapters, every B off its zero init."""
    generator = torch.Generator().manual_seed(5)
    layer = kind(
        quantize_linear(nn.Linear(96, 40).to(dtype), fmt), *sizes, dtype=torch.float32, generator=generator
    )
    with torch.no_grad():
        for name, tensor in layer.named_parameters():
            if name.endswith("B"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return layer


@pytest.mark.parametrize("fmt", FORMATS)
@PRECISIONS
def test_layer_matches_the_float64_reference(fmt, dtype, tol) -> None:
    """y = x W^T + b + s (x A^T) B^T, s = alpha / r = 2."""
    layer = adapter_layer(QLoRALinear, fmt, dtype, 4, 8.0)
    against_float64(
        layer, ("lora_A", "lora_B"), lambda x, w, bias, a, b: x @ (w + 2.0 * b @ a).T + bias, dtype, tol
    )


def _pair(fmt: str = "bnb-nf4", config: slimtune.MethodConfig = LORA) -> tuple[nn.Module, nn.Module]:
    quantized = quantize(make_model("llama"), fmt)
    twin = dense_twin(quantized)
    return slimtune.apply(quantized, config), slimtune.apply(twin, config)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
def test_a_quantized_llama_trains_as_lora_on_its_dequantized_twin(fmt) -> None:
    quantized, twin = _pair(fmt)
    assert sum(isinstance(m, QLoRALinear) for m in quantized.modules()) == 14
    mine, theirs = sharded_steps(quantized, _adamw(quantized), 0, 1), sharded_steps(twin, _adamw(twin), 0, 1)
    assert mine == pytest.approx(theirs, rel=1e-6)
    for name, layer in slimtune.state.patched_layers(quantized).items():
        other = twin.get_submodule(name)
        torch.testing.assert_close(layer.lora_B, other.lora_B, rtol=1e-4, atol=ADAM_ATOL, msg=name)


def test_checkpoints_and_peft_adapters_load_across_the_quantized_model_and_its_twin(tmp_path) -> None:
    quantized, _ = _pair()
    sharded_steps(quantized, _adamw(quantized), 0, 1)
    ids = make_batch()
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
    for form in ("slimtune", "peft"):
        folder = slimtune.save(quantized, tmp_path / form, format=form)
        dense = dense_twin(quantize(make_model("llama")))
        loaded = slimtune.load(dense, folder) if form == "slimtune" else slimtune.load_peft(dense, folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5, msg=form)
    again = slimtune.load(quantize(make_model("llama")), tmp_path / "slimtune")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
def test_merge_gives_dense_weights_and_unmerge_is_refused(fmt, method) -> None:
    quantized, twin = _pair(fmt, ADAPTERS[method])
    sharded_steps(quantized, _adamw(quantized), 0, 1)
    sharded_steps(twin, _adamw(twin), 0, 1)
    ids = make_batch()
    with torch.no_grad():
        before = quantized(input_ids=ids).logits
    merged = slimtune.merge(quantized)
    assert not any(slimtune.quantized.is_4bit(m) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    refused(merged, lambda: slimtune.unmerge(merged), ValueError, "cannot give back 4-bit weights")


def _hydra(x, w, bias, ap, bp, as_, bs):
    h = x @ w.T
    return h + bias + 2.0 * (x @ ap.T) @ bp.T + (4.0 / 3) * (h @ as_.T) @ bs.T


@pytest.mark.parametrize("fmt", FORMATS)
@PRECISIONS
def test_qhydra_layer_matches_the_float64_reference(fmt, dtype, tol) -> None:
    """y = h + b + sp (x Ap^T) Bp^T + ss (h As^T) Bs^T with h = x W^T (sp = 4/2, ss = 4/3)."""
    layer = adapter_layer(QHydraLinear, fmt, dtype, 2, 3, 4.0)
    against_float64(layer, HYDRA_TENSORS, _hydra, dtype, tol)


@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
def test_a_quantized_llama_trains_as_hydra_on_its_dequantized_twin(fmt) -> None:
    quantized, twin = _pair(fmt, HYDRA)
    assert sum(isinstance(m, QHydraLinear) for m in quantized.modules()) == 14
    mine, theirs = sharded_steps(quantized, _adamw(quantized), 0, 1), sharded_steps(twin, _adamw(twin), 0, 1)
    assert mine == pytest.approx(theirs, rel=1e-6) and mine[-1] < mine[0]
    for name, layer in slimtune.state.patched_layers(quantized).items():
        other = twin.get_submodule(name)
        for key in HYDRA_TENSORS:
            torch.testing.assert_close(
                getattr(layer, key), getattr(other, key), rtol=1e-4, atol=ADAM_ATOL, msg=name
            )


def test_hydra_checkpoints_load_across_the_quantized_model_and_its_twin(tmp_path) -> None:
    quantized, _ = _pair(config=HYDRA)
    sharded_steps(quantized, _adamw(quantized), 0, 1)
    ids = make_batch()
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
    slimtune.save(quantized, tmp_path / "q")
    dense = slimtune.load(dense_twin(quantize(make_model("llama"))), tmp_path / "q")
    slimtune.save(dense, tmp_path / "d")
    again = slimtune.load(quantize(make_model("llama")), tmp_path / "d")
    assert any(isinstance(m, QHydraLinear) for m in again.modules())
    with torch.no_grad():
        for model in (dense, again):
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_corda_on_a_4bit_base_is_refused_by_name() -> None:
    model = quantize(make_model("llama"))
    corda = slimtune.LoRAConfig(r=4, alpha=8, init="corda-kpm")
    covariances = {
        n: torch.eye(m.in_features, dtype=torch.float64)
        for n, m in model.named_modules()
        if slimtune.quantized.is_4bit(m)
    }
    refused(
        model, lambda: slimtune.corda.apply(model, corda, covariances), ValueError, "is a 4-bit base: CorDA"
    )


def test_peft_loads_the_adapter_onto_its_own_bitsandbytes_base(tmp_path) -> None:
    """A QLoRA model loaded with BitsAndBytesConfig saves as a PEFT adapter; PEFT's own 4-bit LoRA
    on the same base gives the same logits."""
    import transformers
    from peft import PeftModel

    make_model("llama").save_pretrained(tmp_path / "base")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def load() -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=config, device_map="cpu"
        )

    ours = slimtune.apply(load(), LORA).train()
    sharded_steps(ours, _adamw(ours), 0, 1)
    theirs = PeftModel.from_pretrained(
        load(), slimtune.save(ours, tmp_path / "adapter", format="peft")
    ).train()
    ids = make_batch()
    with torch.no_grad():  # (in train mode: bitsandbytes repacks for its CPU inference kernel in eval)
        torch.testing.assert_close(
            theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
@pytest.mark.parametrize("config", [slimtune.PaCAConfig(r=4), LORA, HYDRA], ids=["qpaca", "qlora", "qhydra"])
def test_gradient_checkpointing_on_a_4bit_base_takes_the_same_steps(config, fmt) -> None:
    """HF gradient checkpointing recomputes the 4-bit products in backward: the steps are the same."""
    runs = []
    for checkpointing in (False, True):
        model = slimtune.apply(quantize(make_model("llama"), fmt), config).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        runs.append(sharded_steps(model, _adamw(model), 0, 1))
    assert runs[1] == runs[0]


def test_sharding_engines_are_refused_for_a_qlora_model_by_name() -> None:
    """A LoRA model is not guarded (engines shard it exactly), unless a layer sits on a 4-bit base."""
    model = slimtune.apply(quantize(make_model("llama")), LORA)
    model(input_ids=make_batch())  # no engine: trains
    for number, parameter in enumerate(model.parameters()):
        parameter.ds_id = number  # what DeepSpeed ZeRO-3 marks
    described = r"has 4-bit bases \(bitsandbytes Linear4bit \(nf4\); QPaCA, QLoRA, QHydra\)"
    with pytest.raises(RuntimeError, match=described + ".*DeepSpeed ZeRO-3"):
        model(input_ids=make_batch())


def test_fsdp2_of_a_bitsandbytes_base_is_refused_by_name(tmp_path) -> None:
    """FSDP2 shards a bitsandbytes 4-bit weight without its quantization state (kept beside the
    parameter): the first forward refuses, naming the format and what shards (torchao NF4)."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = slimtune.apply(quantize(make_model("llama"), "bnb-nf4"), LORA)
        fully_shard(model)
        with pytest.raises(RuntimeError, match=r"bitsandbytes Linear4bit \(nf4\).*FSDP2.*torchao NF4"):
            model(input_ids=make_batch())
    finally:
        dist.destroy_process_group()


SHARDED = {"qpaca": slimtune.PaCAConfig(r=4), **ADAPTERS}


def _fsdp2_worker(rank: int, world: int, out: str) -> None:
    """Each method on torchao NF4 bases, sharded block by block over `world` gloo processes: the
    losses of 5 AdamW steps and the trained tensors gathered."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{out}.pg", rank=rank, world_size=world)
    results = {}
    for name, config in SHARDED.items():
        model = slimtune.apply(quantize(make_model("llama"), "torchao-nf4"), config)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        losses = sharded_steps(model, _adamw(model), rank, world)
        trained = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (losses, trained)
    if rank == 0:
        torch.save(results, out)


def test_fsdp2_with_two_processes_trains_torchao_nf4_bases_as_one_process(tmp_path) -> None:
    """torchao's NF4Tensor splits and gathers its inner tensors for FSDP2 (as torchtune's QLoRA uses
    it): QPaCA, QLoRA and QHydra take the steps of one process (the scaler groups split evenly)."""
    sharded = run_two_processes(_fsdp2_worker, tmp_path)
    for name, config in SHARDED.items():
        model = slimtune.apply(quantize(make_model("llama"), "torchao-nf4"), config)
        losses = sharded_steps(model, _adamw(model), 0, 1)
        mine, trained = sharded[name]
        assert mine == pytest.approx(losses, rel=1e-6), name
        for key, tensor in trained.items():  # (reduction order rounds here, as under DDP)
            theirs, where = model.get_parameter(key), f"{name} {key}"
            torch.testing.assert_close(
                tensor, theirs, rtol=1e-4, atol=ADAM_ATOL, msg=lambda m, w=where: f"{w}: {m}"
            )


@pytest.mark.parametrize(
    ("fmt", "config"),
    [
        ("bnb-nf4", slimtune.PaCAConfig(r=4)),
        ("torchao-nf4", LORA),
        pytest.param("bnb-nf4", LORA, marks=pytest.mark.slow),
        ("bnb-nf4", HYDRA),
        pytest.param("torchao-nf4", slimtune.PaCAConfig(r=4), marks=pytest.mark.slow),
    ],
    ids=["bnb-qpaca", "torchao-qlora", "bnb-qlora", "bnb-qhydra", "torchao-qpaca"],
)
def test_a_decoder_block_on_a_4bit_base_compiles_fullgraph_with_the_eager_gradients(fmt, config) -> None:
    """torch.compile(fullgraph=True) of a block of 4-bit linears (the libraries' own products are
    traceable): the output, the input gradient and every trained tensor's gradient as in eager."""
    model = slimtune.apply(quantize(make_model("llama"), fmt), config).train()
    with torch.no_grad():  # off the identity init, so every trained tensor gets a gradient
        for p in slimtune.trainable_parameters(model):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    block = model.model.layers[0]
    hidden = torch.randn(2, 7, model.config.hidden_size, requires_grad=True)
    rope = model.model.rotary_emb(hidden, torch.arange(7)[None].expand(2, -1))
    trained = [p for p in block.parameters() if p.requires_grad]

    def run(module) -> list[torch.Tensor]:
        out = module(hidden, position_embeddings=rope, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        return [out.detach(), *torch.autograd.grad(out.square().sum(), [hidden, *trained])]

    expected = run(block)
    torch._dynamo.reset()
    got = run(torch.compile(block, fullgraph=True))
    assert len(trained) > 0 and all(g.abs().sum() > 0 for g in expected[2:])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["qpaca", *ADAPTERS])
@pytest.mark.parametrize("fmt", ["bnb-nf4-double", "torchao-nf4"])
def test_merge_with_requantize_quantizes_each_merged_linear_as_its_base_was(fmt, method) -> None:
    config = ADAPTERS.get(method, slimtune.PaCAConfig(r=4))

    def trained() -> nn.Module:  # twice the same run (a deepcopy would re-quantize torchao's weights)
        model = slimtune.apply(quantize(make_model("llama"), fmt), config)
        sharded_steps(model, _adamw(model), 0, 1)
        return model

    model, dense = trained(), slimtune.merge(trained())  # the merged weights, dense
    layers = slimtune.state.patched_layers(model).items()
    bases = {name: slimtune.quantized.describe(layer.base) for name, layer in layers}
    with pytest.warns(UserWarning, match="rounding changes their weights"):
        slimtune.merge(model, requantize=True)
    for name, described in bases.items():
        layer, merged = model.get_submodule(name), dense.get_submodule(name)
        assert slimtune.quantized.describe(layer) == described, name
        again = slimtune.quantized.quantized_like(layer, merged)  # the same quantization of the same weight
        assert torch.equal(slimtune.quantized.dequantized(layer), slimtune.quantized.dequantized(again)), name
        assert not torch.equal(slimtune.quantized.dequantized(layer), merged.weight.detach()), name  # rounded


def test_merge_with_requantize_of_a_dense_model_is_refused() -> None:
    model = slimtune.apply(make_model("llama"), LORA)
    merge = lambda: slimtune.merge(model, requantize=True)  # noqa: E731
    refused(model, merge, ValueError, "no layer of this .* 4-bit base")
