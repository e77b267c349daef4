"""LoRA and Hydra on tiny models: PEFT parity, PEFT round trips, exact merge/unmerge, refusals."""

from __future__ import annotations

import contextlib
import copy
import json

import peft
import pytest
import slimtune
import torch
from slimtune import ops
from slimtune.layers import HydraLinear, LoRALinear
from test_refusals import refused
from tiny_models import make_batch, make_model
from torch import nn

FAMILIES = ["llama", "qwen2", "mistral", "phi3", "gemma"]  # gemma: GeGLU (tanh)
LORA_OPS = ("lora_linear", "lora_input_grad", "glu_down", "glu_backward")


def peft_model(base: nn.Module, targets="all-linear", r=4, alpha=8, dropout=0.0, **kwargs) -> nn.Module:
    """PEFT LoRA with random (non-zero) B so that every gradient is meaningful."""
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, init_lora_weights=False, **kwargs
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


def peft_pair(family: str, tmp_path, dtype=torch.float32, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, slimtune model loaded from PEFT's saved adapter) on the same base weights."""
    base = make_model(family, dtype=dtype)
    ref = peft_model(base, **kwargs)
    ref.save_pretrained(tmp_path)
    return ref, slimtune.load_peft(base, tmp_path)


def peft_grads(ref: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter gradients under slimtune's parameter names."""
    return {
        n.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad
        for n, p in ref.named_parameters()
        if p.requires_grad
    }


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach()


def assert_same_training(ref: nn.Module, ours: nn.Module, tol: float = 2e-5) -> None:
    ids = make_batch()
    ref_loss, ref_logits = loss_and_grads(ref, ids)
    loss, logits = loss_and_grads(ours, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    expected = peft_grads(ref)
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trained.keys() == expected.keys()
    for name, param in trained.items():
        scale = expected[name].abs().max()
        torch.testing.assert_close(param.grad / scale, expected[name] / scale, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_adapter_gradients_equal_peft(family, tmp_path):
    ref, ours = peft_pair(family, tmp_path)
    fusion = ours._slimtune_state.extra.fusion
    assert len(fusion.mlps) == 2  # every block's gated MLP takes the fused path
    assert len(fusion.groups) == (0 if family == "phi3" else 6)  # q/k/v share one read of x
    assert_same_training(ref, ours)


@pytest.mark.parametrize(
    "family, targets",
    [
        ("llama", ["q_proj", "v_proj"]),  # a group of two siblings
        ("llama", ["gate_proj", "down_proj"]),  # a partial MLP: per-layer path
        ("qwen2", ["k_proj", "up_proj", "o_proj"]),
        ("phi3", ["qkv_proj", "down_proj"]),
    ],
)
def test_target_subsets_equal_peft(family, targets, tmp_path):
    ref, ours = peft_pair(family, tmp_path, targets=targets)
    assert_same_training(ref, ours)


@pytest.mark.parametrize("backend", ["triton", "blas"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])
def test_native_backends_give_the_reference_path(family, backend, tmp_path):
    """The whole model on the Triton kernels (interpreter on CPU), or on the BLAS-ordered products
    (the CUDA default), against the PyTorch references."""
    _, ours = peft_pair(family, tmp_path, r=3)
    ids = make_batch(batch=2, seq=7)
    _, expected = loss_and_grads(ours, ids)
    expected_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    ours.zero_grad()
    with contextlib.ExitStack() as stack:
        for op in LORA_OPS:
            if backend in ops.OPS[op].impls:
                stack.enter_context(ops.use_backend(op, backend))
        _, logits = loss_and_grads(ours, ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for name, param in ours.named_parameters():
        if param.requires_grad:
            scale = expected_grads[name].abs().max()
            torch.testing.assert_close(param.grad / scale, expected_grads[name] / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_an_optimizer_step_gives_peft_weights(family, tmp_path):
    ref, ours = peft_pair(family, tmp_path)
    ids = make_batch()
    for model, params in ((ref, [p for p in ref.parameters() if p.requires_grad]), (ours, None)):
        optimizer = torch.optim.AdamW(
            params or slimtune.trainable_parameters(model), lr=1e-2, weight_decay=0.1
        )
        loss_and_grads(model, ids)
        optimizer.step()
    expected = {
        n.removeprefix("base_model.model.").replace(".default.weight", ""): p
        for n, p in ref.named_parameters()
        if p.requires_grad
    }
    for name, param in ours.named_parameters():
        if param.requires_grad:
            # AdamW's first step is about lr * sign(grad): 1e-5 is 0.1% of it (grads near 0 round apart)
            torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_equals_peft_with_the_same_random_stream(tmp_path):
    ref, ours = peft_pair("llama", tmp_path, dropout=0.25)
    assert not ours._slimtune_state.extra.fusion.mlps  # dropout: the per-layer path
    ids = make_batch()
    ref.train()
    ours.train()
    torch.manual_seed(7)
    _, ref_logits = loss_and_grads(ref, ids)
    torch.manual_seed(7)
    _, logits = loss_and_grads(ours, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=2e-5, atol=2e-5)
    expected = peft_grads(ref)
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=2e-5, atol=2e-5, msg=name)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=2e-5, atol=2e-5
        )


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_save_peft_loads_in_peft_with_the_same_outputs(family, tmp_path):
    _, ours = peft_pair(family, tmp_path / "peft", targets=["o_proj", "down_proj"], r=2, alpha=3)
    with torch.no_grad():
        for param in slimtune.trainable_parameters(ours):
            param.add_(torch.randn_like(param) * 0.1)  # ours now differs from the loaded adapter
    slimtune.save(ours, tmp_path / "ours", format="peft")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 2 and saved["lora_alpha"] == 3
    loaded = peft.PeftModel.from_pretrained(make_model(family), tmp_path / "ours")
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_slimtune_checkpoints_round_trip(tmp_path):
    for config in (slimtune.LoRAConfig(r=3, alpha=6, seed=5), slimtune.HydraConfig(2, 3, alpha=4)):
        model = slimtune.apply(make_model("qwen2"), config)
        with torch.no_grad():
            for param in slimtune.trainable_parameters(model):
                param.normal_()
        slimtune.save(model, tmp_path / config.method)
        loaded = slimtune.load(make_model("qwen2"), tmp_path / config.method)
        assert loaded._slimtune_state.config == config
        ids = make_batch()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unknown_save_format_is_refused(tmp_path):
    model = slimtune.apply(make_model("llama"), slimtune.LoRAConfig(r=2, alpha=2))
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        slimtune.save(model, tmp_path, format="onnx")
    hydra = slimtune.apply(make_model("llama"), slimtune.HydraConfig(2, 2, alpha=2))
    with pytest.raises(ValueError, match="hydra has no PEFT equivalent"):
        slimtune.save(hydra, tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.3)


@pytest.mark.parametrize(
    "config",
    [slimtune.LoRAConfig(r=4, alpha=8), slimtune.HydraConfig(r_parallel=3, r_sequential=2, alpha=4)],
    ids=["lora", "hydra"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_exact_and_unmerge_restores_bits(config, dtype):
    model = slimtune.apply(make_model("llama", dtype=dtype), config)
    _randomise(model)
    layers = {name: model.get_submodule(name) for name in model._slimtune_state.modules}
    base = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    deltas = {}
    for name, layer in layers.items():
        with torch.no_grad():
            a, b = layer.adapter(torch.float64)
        deltas[name] = b @ a
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = make_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        slimtune.merge(model)
        merged = model(input_ids=ids).logits
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(merged, before, rtol=tol, atol=tol)
    for name, weight in base.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear
        assert torch.equal(linear.weight, (weight.double() + deltas[name]).to(dtype))  # rounded once

    slimtune.unmerge(model)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for name, weight in base.items():
        assert torch.equal(model.get_submodule(name).weight.view(bits), weight.view(bits)), name
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    loss_and_grads(model, ids)  # trains again


@pytest.mark.parametrize(
    "config",
    [slimtune.LoRAConfig(r=4, alpha=8), slimtune.HydraConfig(r_parallel=3, r_sequential=2, alpha=4)],
    ids=["lora", "hydra"],
)
def test_a_model_merged_after_training_holds_no_graph_and_deepcopies(config):
    """Merging right after training (autograd on, as users call it) keeps no autograd graph in the
    unmerge record: the merged model deep-copies, and still unmerges to the trained adapters."""
    import copy

    model = slimtune.apply(make_model("llama"), config)
    loss_and_grads(model, make_batch())
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    slimtune.merge(model)
    twin = copy.deepcopy(model)
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in twin.named_parameters())
    slimtune.unmerge(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name


def test_unmerge_refusals():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"not merged by slimtune\.merge"):
        slimtune.unmerge(model)
    slimtune.merge(slimtune.apply(model, slimtune.LoRAConfig(r=2, alpha=2)))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(2)
    refused(
        model,
        lambda: slimtune.unmerge(model),
        ValueError,
        r"'model.layers.1.mlp.up_proj' was replaced or modified",
    )


def test_hydra_is_the_identity_at_init_and_trains():
    base = make_model("mistral")
    model = slimtune.apply(copy.deepcopy(base), slimtune.HydraConfig(r_parallel=4, r_sequential=4, alpha=8))
    assert all(isinstance(m, HydraLinear) for m in slimtune.state.patched_layers(model).values())
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-6, atol=1e-6
        )
    optimizer = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, _ = loss_and_grads(model, ids)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("bias", [False, True])
def test_hydra_layer_follows_its_formula(bias):
    """y = W0 x + b + sp Bp Ap x + ss Bs As (W0 x), outputs and every gradient, against float64 autograd."""
    torch.manual_seed(0)
    layer = HydraLinear(nn.Linear(12, 9, bias=bias), r_parallel=3, r_sequential=2, alpha=5)
    _randomise(layer)
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    p = {n: t.detach().double().requires_grad_() for n, t in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    base = x64 @ p["weight"].T
    ref = base + 5 / 3 * (x64 @ p["parallel_A"].T) @ p["parallel_B"].T
    ref = ref + 5 / 2 * (base @ p["sequential_A"].T) @ p["sequential_B"].T
    if bias:
        ref = ref + p["bias"]
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for name in HydraLinear.trained_names:
        torch.testing.assert_close(getattr(layer, name).grad.double(), p[name].grad, rtol=1e-5, atol=1e-5)


def test_fp32_masters_on_a_bf16_model():
    model = slimtune.apply(
        make_model("llama", dtype=torch.bfloat16), slimtune.LoRAConfig(r=4, alpha=8, fp32_master=True)
    )
    params = slimtune.trainable_parameters(model)
    assert {p.dtype for p in params} == {torch.float32}
    ids = make_batch()
    _, logits = loss_and_grads(model, ids)
    assert logits.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in params)
    default = slimtune.apply(make_model("llama", dtype=torch.bfloat16), slimtune.LoRAConfig(r=4, alpha=8))
    assert {p.dtype for p in slimtune.trainable_parameters(default)} == {torch.bfloat16}


def test_autocast_and_gradient_checkpointing(tmp_path):
    ref, ours = peft_pair("llama", tmp_path)
    ids = make_batch()
    loss_and_grads(ours, ids)
    expected = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    ours.zero_grad()
    ours.gradient_checkpointing_enable()
    ours.train()
    loss_and_grads(ours, ids)
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours(input_ids=ids).logits
        ref_logits = ref(input_ids=ids).logits
    assert logits.dtype == ref_logits.dtype
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=0.05, atol=0.05)


def test_generate_and_inference_mode_match_peft(tmp_path):
    ref, ours = peft_pair("qwen2", tmp_path)
    prompt = make_batch(batch=1, seq=5)
    with torch.no_grad():
        expected = ref.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(input_ids=prompt, max_new_tokens=6, do_sample=False), expected)
        logits = ours(input_ids=prompt).logits
    with torch.inference_mode():
        assert torch.equal(ours(input_ids=prompt).logits, logits)
    assert all(layer.shared.enabled for layer in slimtune.state.patched_layers(ours).values() if layer.shared)


def test_siblings_called_apart_fall_back_to_separate_projections():
    model = slimtune.apply(make_model("llama"), slimtune.LoRAConfig(r=2, alpha=2))
    _randomise(model)
    attention = model.model.layers[0].self_attn
    x, other = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    expected = [
        ops.lora_linear_ref(
            t.reshape(-1, 64), m.weight, None, t.reshape(-1, 64) @ m.lora_A.T, m.lora_B * m.scaling
        )
        for t, m in ((x, attention.q_proj), (other, attention.k_proj))
    ]
    q = attention.q_proj(x)
    with pytest.warns(UserWarning, match="run unfused"):
        k = attention.k_proj(other)
    torch.testing.assert_close(q.reshape(-1, 64), expected[0].detach())
    torch.testing.assert_close(k.reshape(-1, 32), expected[1].detach())
    assert not attention.q_proj.shared.enabled


# ---- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: slimtune.LoRAConfig(r=0, alpha=1), ValueError, r"r must be >= 1"),
        (lambda: slimtune.LoRAConfig(r=-3, alpha=1), ValueError, r"r must be >= 1"),
        (lambda: slimtune.LoRAConfig(r=2.0, alpha=1), TypeError, r"r must be an int"),
        (lambda: slimtune.LoRAConfig(r=2, alpha=1, dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (lambda: slimtune.LoRAConfig(r=2, alpha=1, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
        (lambda: slimtune.LoRAConfig(r=2, alpha=0), ValueError, r"alpha must be a finite number > 0"),
        (lambda: slimtune.LoRAConfig(r=2, alpha=1, target_modules=[]), ValueError, r"empty"),
        (lambda: slimtune.HydraConfig(0, 2, alpha=1), ValueError, r"r_parallel must be >= 1"),
        (lambda: slimtune.HydraConfig(2, -1, alpha=1), ValueError, r"r_sequential must be >= 1"),
    ],
)
def test_bad_configs_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "config",
    [
        slimtune.LoRAConfig(r=2, alpha=2, target_modules=["nope_proj"]),
        slimtune.HydraConfig(1, 1, 1, "model\\.x.*"),
    ],
)
def test_patterns_matching_nothing_are_refused(config):
    model = make_model("llama")
    refused(model, lambda: slimtune.apply(model, config), ValueError, r"match no module")


def test_peft_adapters_for_other_modules_or_shapes_are_refused(tmp_path):
    peft_model(make_model("phi3"), targets=["qkv_proj"]).save_pretrained(tmp_path / "phi3")
    peft_model(make_model("llama", hidden_size=32), targets=["q_proj"]).save_pretrained(tmp_path / "narrow")
    model = make_model("llama")
    refused(
        model,
        lambda: slimtune.load_peft(model, tmp_path / "phi3"),
        ValueError,
        r"qkv_proj'\] match no module",
    )
    refused(
        model,
        lambda: slimtune.load_peft(model, tmp_path / "narrow"),
        ValueError,
        r"lora_A of .* has shape \(4, 32\)",
    )


def test_other_peft_types_and_options_are_refused(tmp_path):
    base = make_model("llama")
    ia3 = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    peft.get_peft_model(copy.deepcopy(base), ia3).save_pretrained(tmp_path / "ia3")
    peft_model(base, targets=["q_proj"], use_dora=True).save_pretrained(tmp_path / "dora")
    refused(
        base,
        lambda: slimtune.load_peft(base, tmp_path / "ia3"),
        ValueError,
        r"'IA3' adapter; .* LoRA adapters only",
    )
    refused(base, lambda: slimtune.load_peft(base, tmp_path / "dora"), ValueError, r"use_dora=True")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json not found"):
        slimtune.load_peft(base, tmp_path)


# ---- GPU, bf16 ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["blas", "triton"])  # the CUDA default (cuBLAS), and the fused kernel
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_gpu_bf16_matches_peft_bf16(family, backend, tmp_path):
    base = make_model(family, dtype=torch.bfloat16, hidden_size=256, intermediate_size=704).cuda()
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    ref.save_pretrained(tmp_path)
    ours = slimtune.load_peft(base, tmp_path)
    assert all(isinstance(m, LoRALinear) for m in slimtune.state.patched_layers(ours).values())
    assert ops.lora_linear.choose(torch.device("cuda"))[0] == "blas"
    ids = make_batch(batch=2, seq=64).cuda()
    _, ref_logits = loss_and_grads(ref, ids)
    with contextlib.ExitStack() as stack:
        for op in ("lora_linear", "lora_input_grad"):
            stack.enter_context(ops.use_backend(op, backend))
        _, logits = loss_and_grads(ours, ids)
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=0.05, atol=0.1)
    expected = peft_grads(ref)
    for name, param in ours.named_parameters():
        if param.requires_grad:
            cosine = torch.nn.functional.cosine_similarity(
                param.grad.flatten().float(), expected[name].flatten().float(), 0
            )
            assert cosine > 0.99, name


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_peft_adapters_initialised_without_touching_the_base_load_exactly(init, tmp_path):
    """PEFT's orthogonal and MiCA initialisations write only lora_A/lora_B: their adapters load onto the
    plain base with PEFT's outputs, and a MiCA adapter keeps lora_B frozen, as PEFT trains it."""
    base = make_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # trained adapters (MiCA's lora_A starts at zero)
        for name, parameter in ref.named_parameters():
            if "lora_A" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    ref.save_pretrained(tmp_path)
    ours = slimtune.load_peft(copy.deepcopy(base), tmp_path)
    ids = make_batch()
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.").replace(".default.weight", "")
              for n, p in ref.named_parameters() if p.requires_grad}  # fmt: skip
    assert trained == theirs and any(".lora_B" in n for n in trained) == (init == "orthogonal")
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in slimtune.trainable_parameters(ours))
