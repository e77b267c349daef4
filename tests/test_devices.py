"""The custom ops, torch.compile and lean mode on each device: the CPU variant runs in CI, the CUDA
variant (marked gpu) wherever CUDA is present, with the same test body."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
import torch._dynamo as dynamo
from slimtune import library, ops
from tiny_models import make_batch, make_model

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
CONFIGS = {
    "paca": lambda: slimtune.PaCAConfig(r=4),
    "s2ft": lambda: slimtune.S2FTConfig(heads=1, channels=8),
    "lora": lambda: slimtune.LoRAConfig(r=4, alpha=8),
}


def model_on(device: str, method: str) -> torch.nn.Module:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = make_model("llama", dtype=dtype).to(device)
    slimtune.apply(model, CONFIGS[method]())
    with torch.no_grad():  # off the identity init, so every trained tensor gets a gradient
        for p in slimtune.trainable_parameters(model):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p))
    return model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, call=None) -> tuple[torch.Tensor, list]:
    loss = (model if call is None else call)(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.float().clone() for p in slimtune.trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def assert_same(got: tuple, expected: tuple, device: str) -> None:
    """Losses and gradients agree: tightly in float32 on CPU; in bf16 on CUDA by value and direction."""
    (loss, grads), (ref_loss, ref_grads) = got, expected
    tolerance = 2e-2 if device == "cuda" else 1e-5
    torch.testing.assert_close(loss, ref_loss, rtol=tolerance, atol=tolerance)
    assert len(grads) == len(ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        if device == "cuda":
            assert torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), 0) > 0.99
        else:
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_lean_matches_the_plain_model(device: str, method: str) -> None:
    model = model_on(device, method)
    lean = slimtune.lean(copy.deepcopy(model))
    ids = make_batch().to(device)
    assert_same(loss_and_grads(lean, ids), loss_and_grads(model, ids), device)


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("device", [CUDA])  # CPU: tests/test_compile.py
def test_compiled_model_matches_eager(device: str, method: str) -> None:
    model = model_on(device, method)
    ids = make_batch().to(device)
    expected = loss_and_grads(model, ids)
    dynamo.reset()
    assert dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count == 0
    assert_same(loss_and_grads(model, ids, torch.compile(model)), expected, device)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_custom_ops_pass_opcheck(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    x, w = rand(5, 16, grad=True), rand(24, 16)
    idx = torch.tensor([0, 4, 7], device=device)
    cases = [
        (library.gather_columns, (x.detach(), idx)),
        (library.column_grad, (rand(5, 24), x.detach(), idx, torch.float32)),
        (library.partial_linear, (x, w, None, w[:, idx].clone().requires_grad_(True), idx, 1, True)),
        (library.lora_linear, (x.detach(), w, None, rand(5, 2), rand(24, 2))),
        (library.glu_down, (rand(5, 16), rand(5, 16), rand(2, 16), "silu")),
        (library.glu_backward, (rand(5, 16), rand(5, 16), rand(5, 16), "silu")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    assert ops.lora_linear.choose(torch.device(device))[0] == ("blas" if device == "cuda" else "torch")
