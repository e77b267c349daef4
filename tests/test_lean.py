"""`slimtune.lean`: lean RMSNorm, gated MLP and chunked LM head + loss give the model's own losses,
gradients and training trajectories on several families and every method, and keep for backward
exactly the tensors they are meant to keep."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import slimtune
import torch
import transformers
from slimtune.apps import accounting
from slimtune.layers.lean import LeanGatedMLP, LeanLMHead, LeanRMSNorm
from tiny_models import COMMON, make_batch
from torch import nn

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 24}),  # GeGLU, (1 + w) RMSNorm
    "gemma2": ("Gemma2Config", {"head_dim": 24, "final_logit_softcapping": 5.0}),  # logit soft-capping
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),  # fused gate_up
}
METHODS = {
    "floor": None,
    "paca": lambda: slimtune.PaCAConfig(r=4),
    "s2ft": lambda: slimtune.S2FTConfig(heads=1, channels=8, train_gate_up_rows=True),
    "lora": lambda: slimtune.LoRAConfig(r=4, alpha=8),
    "full": None,
}


def build(family: str, **overrides) -> nn.Module:
    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def prepared(family: str, method: str, **overrides) -> nn.Module:
    model = build(family, **overrides)
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif METHODS[method] is not None:
        slimtune.apply(model, METHODS[method]())
        with torch.no_grad():  # off the identity init, so every trained tensor gets a gradient
            for p in slimtune.trainable_parameters(model):
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def labels_with_ignored(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that carries no loss
    return labels


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lean_gives_the_same_loss_gradients_and_trajectory(family: str, method: str) -> None:
    reference = prepared(family, method)
    lean = slimtune.lean(copy.deepcopy(reference))
    assert any(isinstance(m, LeanGatedMLP) for m in lean.modules()) or method == "lora"
    assert any(isinstance(m, LeanRMSNorm) for m in lean.modules())
    assert isinstance(lean.get_output_embeddings(), LeanLMHead)
    ids = make_batch()
    labels = labels_with_ignored(ids)
    with torch.no_grad():  # without labels: the plain LM head, the model's own logits
        torch.testing.assert_close(
            lean(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )
    # SGD, and the loss compared at every step: in these tiny random models a 1e-7 perturbation of
    # the plain model's own weights grows to ~1e-3 in the gradients within 20 steps (checked), so the
    # gradients are compared exactly at the first step and the trajectory by its losses and end point.
    optimizers = [torch.optim.SGD(trainable(m).values(), lr=0.02) for m in (reference, lean) if trainable(m)]
    for step in range(20 if optimizers else 1):
        losses, grads = [], []
        for model in (reference, lean):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in trainable(model).items()})
        tolerance = 1e-5 if step == 0 else 1e-3
        torch.testing.assert_close(losses[1], losses[0], rtol=tolerance, atol=tolerance, msg=f"step {step}")
        assert grads[0].keys() == grads[1].keys()
        if step == 0:
            for name, g in grads[0].items():
                scale = g.abs().max().clamp_min(1e-8)
                torch.testing.assert_close(grads[1][name] / scale, g / scale, rtol=1e-5, atol=1e-5, msg=name)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(trainable(reference).items(), trainable(lean).values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=f"after 20 steps: {name}")


def test_lean_with_labels_forms_no_logits_and_generates_as_before() -> None:
    model = prepared("llama", "paca")
    lean = slimtune.lean(copy.deepcopy(model))
    ids = make_batch()
    out = lean(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss is not None
    prompt = ids[:1, :4]
    assert torch.equal(
        lean.generate(prompt, max_new_tokens=5, do_sample=False),
        model.generate(prompt, max_new_tokens=5, do_sample=False),
    )


def test_tied_embeddings_train_in_both_places() -> None:
    reference = prepared("llama", "full", tie_word_embeddings=True)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    lean = slimtune.lean(copy.deepcopy(reference))
    assert lean.get_output_embeddings().weight is lean.model.embed_tokens.weight
    ids = make_batch()
    for model in (reference, lean):
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(
        lean.model.embed_tokens.weight.grad, reference.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_lean_before_or_after_apply_and_unlean() -> None:
    ids = make_batch()
    reference = prepared("llama", "paca")
    expected = reference(input_ids=ids, labels=ids).loss
    lean_first = slimtune.lean(build("llama"))
    slimtune.apply(lean_first, slimtune.PaCAConfig(r=4))
    with torch.no_grad():
        for p, q in zip(trainable(lean_first).values(), trainable(reference).values(), strict=True):
            p.copy_(q)
    torch.testing.assert_close(lean_first(input_ids=ids, labels=ids).loss, expected, rtol=1e-5, atol=1e-6)
    slimtune.unlean(lean_first)
    assert not any(isinstance(m, LeanGatedMLP | LeanRMSNorm | LeanLMHead) for m in lean_first.modules())
    torch.testing.assert_close(lean_first(input_ids=ids, labels=ids).loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="is not lean"):
        slimtune.unlean(lean_first)
    lora = slimtune.lean(build("llama"))
    slimtune.apply(lora, slimtune.LoRAConfig(r=4, alpha=8))  # LoRA's fused MLP wraps the lean one
    lora(input_ids=ids, labels=ids).loss.backward()
    slimtune.merge(lora)
    slimtune.unlean(lora)
    assert type(lora.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_lean_models_pickle() -> None:
    model = slimtune.lean(prepared("llama", "paca"))
    ids = make_batch()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(
            clone(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss
        )


def saved_by_kind(model: nn.Module, ids: torch.Tensor) -> dict[str, int]:
    saved = accounting.SavedTensors()
    existing = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    with accounting.record_saved(model, saved, existing):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return dict(saved.by_kind)


def test_saved_tensors_are_exactly_the_intended_ones() -> None:
    """Lean floor of a 2-block Llama in float32: per block the MLP keeps gate and up (2 N I), each
    norm its input (N H) and rstd (N); the LM head and loss keep dL/dh (N H) and nothing N x V.
    A full-size activation saved anywhere else fails this test."""
    model = slimtune.lean(prepared("llama", "floor"))
    ids = make_batch()
    n, hidden, inter, blocks, f32 = ids.numel(), COMMON["hidden_size"], COMMON["intermediate_size"], 2, 4
    got = saved_by_kind(model, ids)
    assert got["mlp"] == blocks * 2 * n * inter * f32
    norms = 2 * blocks + 1
    assert got["norms"] == norms * (n * hidden + n) * f32
    assert got["lm head and loss"] == n * hidden * f32
    plain = saved_by_kind(prepared("llama", "floor"), ids)
    assert plain["mlp"] == blocks * 3 * n * inter * f32  # HF keeps act(gate) too
    assert plain["lm head and loss"] >= n * COMMON["vocab_size"] * f32  # the float32 logits


def test_lora_recomputes_its_adapted_inputs_from_what_the_norms_keep(monkeypatch) -> None:
    """LoRA + lean: q/k/v (one input) and gate/up (one input) keep the input of the norm their input
    came from, which the norm keeps anyway, instead of the norm's output: 2 N x H fewer bytes per
    block than without (gradients: test_lean_gives_the_same_loss_gradients_and_trajectory[lora]). The
    input embeddings need grad here, so the first norm keeps its input too."""
    from slimtune import library

    model = slimtune.lean(prepared("llama", "lora"))
    model.enable_input_require_grads()
    ids = make_batch()
    shared = sum(saved_by_kind(model, ids).values())
    monkeypatch.setattr(library, "norm_source", lambda t: None)
    unshared = sum(saved_by_kind(model, ids).values())
    assert unshared - shared == 2 * 2 * ids.numel() * COMMON["hidden_size"] * 4  # 2 blocks, float32


@pytest.mark.parametrize(
    "family", ["qwen2", "qwen3", "mistral", "gemma3_text", "llama4_text", "qwen2_moe", "mixtral"]
)
def test_lean_on_more_families_keeps_loss_and_gradients(family: str) -> None:
    """The architecture matrix beyond the four above (MoE and vision-language text parts included):
    a PaCA model gives the same loss and trained gradients with lean on."""
    from test_architectures import build as build_family

    reference = build_family(family)
    slimtune.apply(reference, slimtune.PaCAConfig(r=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MoE blocks that are not gated MLPs keep their own path
        lean = slimtune.lean(copy.deepcopy(reference))
    assert any(isinstance(m, LeanRMSNorm) for m in lean.modules())
    ids = make_batch()
    losses = []
    for model in (reference, lean):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(trainable(reference).items(), trainable(lean).values(), strict=True):
        scale = a.grad.abs().max().clamp_min(1e-8)
        torch.testing.assert_close(b.grad / scale, a.grad / scale, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["floor", "paca", "s2ft", "full"])
def test_backward_in_chunks_of_tokens_gives_the_same_gradients(method: str, monkeypatch) -> None:
    """The norm and MLP backward run over chunks of tokens (bounding their float32 temporaries);
    with 5-token chunks (7 chunks here, the last one short) the gradients are the unchunked ones."""
    import slimtune.layers.lean as lean_layers
    from slimtune import ops

    reference = slimtune.lean(prepared("phi3" if method == "s2ft" else "llama", method))
    chunked = copy.deepcopy(reference)
    ids = make_batch()
    embeds = []
    for model, chunk in ((reference, lean_layers.BACKWARD_CHUNK), (chunked, 5)):
        monkeypatch.setattr(lean_layers, "BACKWARD_CHUNK", chunk)
        monkeypatch.setattr(ops, "NORM_CHUNK", chunk)  # the norm's reference backward
        x = model.model.embed_tokens(ids).detach().requires_grad_(True)  # the input gradient, through it all
        model(inputs_embeds=x, labels=ids).loss.backward()
        embeds.append(x.grad)
    torch.testing.assert_close(embeds[1], embeds[0], rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(trainable(reference).items(), trainable(chunked).values(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("case", ["all labels ignored", "one-token rows"])
def test_no_target_gives_the_plain_model_s_nan_loss_and_zero_gradients(case: str) -> None:
    """The plain model's mean cross-entropy over no target is 0/0 = NaN with zero gradients; lean mode
    once returned 0."""
    plain = build("llama")
    plain_lean = slimtune.lean(copy.deepcopy(plain))
    ids = make_batch(batch=2, seq=6)
    ids, labels = (
        (ids, torch.full_like(ids, -100)) if case == "all labels ignored" else (ids[:, :1], ids[:, :1])
    )
    for model in (plain, plain_lean):
        model(input_ids=ids, labels=labels).loss.backward()
    assert torch.isnan(plain(input_ids=ids, labels=labels).loss)
    assert torch.isnan(plain_lean(input_ids=ids, labels=labels).loss)
    for name, parameter in plain.named_parameters():
        assert torch.equal(plain_lean.get_parameter(name).grad, parameter.grad), name


def test_a_soft_prompt_and_lean_mode_give_the_prompted_loss_and_gradients() -> None:
    """The prompt's hook shifts the labels before lean mode diverts them (they once kept the input's
    length against the prompted hidden states: a shape error)."""
    from slimtune.prompt import attach, make

    base = build("llama").requires_grad_(False)
    ids = make_batch(batch=2, seq=7)
    losses, grads = [], []
    for lean_first in (None, True, False):
        model, prompt = copy.deepcopy(base), make(base, 3, seed=1)
        if lean_first:
            slimtune.lean(model)
        attach(model, prompt)
        if lean_first is False:
            slimtune.lean(model)
        loss = model(input_ids=ids, labels=labels_with_ignored(ids)).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(prompt.weight.grad)
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("step", ["lean", "unlean"])
def test_lean_and_unlean_are_all_or_nothing(step: str, monkeypatch) -> None:
    """A failure at the third module swap leaves the model as it was: no stand-in, no hook left behind
    by `lean`; still lean, and working, after a failed `unlean`."""
    from test_refusals import assert_untouched, snapshot
    from test_transactions import fail_on_call

    model = prepared("llama", "paca")
    ids = make_batch(batch=2, seq=6)
    if step == "unlean":
        slimtune.lean(model)
    expected = model(input_ids=ids, labels=ids).loss
    before, hooks = snapshot(model), (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    with monkeypatch.context() as patch:
        fail_on_call(patch, type(model), "set_submodule", 3, torch.OutOfMemoryError)
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            (slimtune.lean if step == "lean" else slimtune.unlean)(model)
    assert_untouched(model, before)
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert slimtune.lean_report(model)["lean"] == (step == "unlean")
    assert torch.equal(model(input_ids=ids, labels=ids).loss, expected)


@pytest.mark.parametrize(("family", "method"), [("llama", "floor"), ("llama", "paca"), ("gemma", "full"),
                                                ("llama", "s2ft")])  # fmt: skip
def test_recomputing_the_up_projection_keeps_loss_and_gradients_and_saves_its_output(family, method) -> None:
    """slimtune.lean(model, recompute=1.0): every MLP keeps gate only and recomputes up in backward
    from the norm's kept input: the same loss and gradients, N x I fewer bytes kept per block."""
    reference = prepared(family, method)
    ids = make_batch()
    kept = []
    for fraction in (0.0, 1.0):
        lean = slimtune.lean(copy.deepcopy(reference), recompute=fraction)
        assert len(slimtune.lean_report(lean)["recompute up"]) == (2 if fraction else 0)
        kept.append(sum(saved_by_kind(lean, ids).values()))
        loss = lean(input_ids=ids, labels=ids).loss
        loss.backward()
    assert kept[0] - kept[1] == 2 * ids.numel() * COMMON["intermediate_size"] * 4  # 2 blocks, float32
    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(trainable(reference).items(), trainable(lean).values(), strict=True):
        scale = a.grad.abs().max().clamp_min(1e-8)
        torch.testing.assert_close(b.grad / scale, a.grad / scale, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, True, "half"])
def test_a_recompute_fraction_outside_0_1_is_refused_and_the_model_left_as_it_was(fraction) -> None:
    model = build("llama")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="recompute must be a fraction"):
        slimtune.lean(model, recompute=fraction)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_a_loss_option_the_chunked_loss_lacks_runs_the_model_s_own_loss_and_says_so() -> None:
    """shift_labels (HF's context-parallel loss input) is not implemented by the chunked loss: the
    model's own loss runs with the batch's logits, the same loss as the plain model, and a warning
    says so (once)."""
    plain = build("llama")
    lean = slimtune.lean(copy.deepcopy(plain))
    ids = make_batch()
    shifted = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:].contiguous()
    expected = plain(input_ids=ids, labels=ids, shift_labels=shifted)
    with pytest.warns(UserWarning, match="does not implement shift_labels"):
        got = lean(input_ids=ids, labels=ids, shift_labels=shifted)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, expected.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lean(input_ids=ids, labels=ids, shift_labels=shifted)  # said once
        assert lean(input_ids=ids, labels=ids).logits is None  # the chunked loss again
