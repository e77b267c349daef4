"""The lean frozen path's kernels (RMSNorm forward/backward, the gated activation, cross-entropy over
logits in place): Triton (the interpreter on CPU) and the PyTorch references against float64
autograd; their custom ops under torch.library's checks; whole lean models on the kernel path
against the plain model.

bf16 runs only on a GPU (the interpreter's bf16 is not the card's); shapes are small and ragged.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import slimtune
import torch
import torch.nn.functional as F
from slimtune import library, ops
from slimtune.layers.lean import LeanAttention, LeanGatedMLP, LeanRMSNorm
from slimtune.triton_kernels import cross_entropy_, glu, rms_norm_backward, rms_norm_forward, rope
from test_lean import prepared, trainable
from test_lora_kernels import ACTIVATIONS, close
from test_triton_kernels import DEVICE, LAYOUTS, make, poison_empty  # noqa: F401 (a fixture)
from tiny_models import make_batch

DTYPES = [torch.float32, torch.float16]
LEAN_OPS = ("rms_norm_forward", "rms_norm_backward", "rope", "glu", "glu_backward", "cross_entropy_")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def norm64(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, ...]:
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return x64, w64, rstd, x64 * rstd * ((1.0 if gemma else 0.0) + w64)


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("flavor", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d"), [(1, 5), (19, 37), (6, 130)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.usefixtures("poison_empty")
def test_rms_norm_matches_float64_autograd(n, d, dtype, flavor, layout, gen):
    gemma = flavor == "gemma"
    x, dy = make((n, d), dtype, layout, gen), make((n, d), dtype, LAYOUTS[::-1][LAYOUTS.index(layout)], gen)
    w = (0.5 * torch.randn(d, generator=gen)).to(DEVICE, dtype)
    x64, w64, rstd64, y64 = norm64(x, w, 1e-5, gemma)
    y64.backward(dy.double())
    for forward, backward in ((rms_norm_forward, rms_norm_backward),
                              (ops.rms_norm_forward_ref, ops.rms_norm_backward_ref)):  # fmt: skip
        y, rstd = forward(x, w, 1e-5, 1.0 if gemma else 0.0, gemma)
        close(y, y64.detach(), dtype)
        assert rstd.dtype == torch.float32
        torch.testing.assert_close(rstd.double(), rstd64.detach().squeeze(-1), rtol=1e-5, atol=0)
        dx, dw = backward(dy, x, w, rstd, 1.0 if gemma else 0.0, gemma, True)
        close(dx, x64.grad, dtype)
        assert dw.dtype == torch.float32
        close(dw.to(dtype), w64.grad, dtype)
        none, dw_only = backward(dy, x, w, rstd, 1.0 if gemma else 0.0, gemma, False)
        assert none is None
        torch.testing.assert_close(dw_only, dw)


def test_rms_norm_of_a_half_input_with_a_float32_weight_is_float32(gen):
    """Llama's norm under a float32 weight: weight * xhat.to(half) promotes to float32."""
    x, w = make((9, 24), torch.float16, "contiguous", gen), torch.randn(24, generator=gen, device=DEVICE)
    y, rstd = rms_norm_forward(x, w, 1e-6, 0.0, False)
    y_ref, rstd_ref = ops.rms_norm_forward_ref(x, w, 1e-6, 0.0, False)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rstd, rstd_ref)


# --------------------------------------------------------------------------- rotary embedding


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "seq", "dim", "rotary"), [(1, 1, 2, 2), (3, 7, 24, 24), (5, 4, 32, 16)])
@pytest.mark.parametrize("table_batch", [1, 2], ids=["shared tables", "per-row tables"])
def test_rope_and_its_inverse_match_hf_formula_in_float64(heads, seq, dim, rotary, table_batch, dtype, gen):
    """q in HF's layout (the transpose of the projection's output), partial rotary widths (the rest
    passes through), tables shared over the batch or not; the inverse is the gradient."""
    x = torch.randn(2, seq, heads, dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    cos, sin = (torch.randn(table_batch, seq, rotary, generator=gen).to(DEVICE, dtype) for _ in range(2))
    x64 = x.double().requires_grad_()
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    turned = x64[..., :rotary] * c + rotate_half(x64[..., :rotary]) * s
    ref = torch.cat([turned, x64[..., rotary:]], dim=-1)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(grad)
    g = grad.to(DEVICE, dtype)
    for impl in (rope, ops.rope_ref):
        out = impl(x, cos, sin, False)
        assert out.stride() == x.stride()  # x's layout, as x * cos
        close(out.reshape(-1, dim), ref.detach().reshape(-1, dim), dtype)
        close(impl(g, cos, sin, True).reshape(-1, dim), x64.grad.reshape(-1, dim), dtype)


def test_rope_of_half_q_with_float32_tables_is_float32(gen):
    """Under autocast HF's tables stay float32 and q * cos promotes; the kernel's output does too."""
    x = torch.randn(1, 2, 3, 8, generator=gen).to(DEVICE, torch.float16)
    cos, sin = (
        torch.randn(1, 3, 8, generator=gen, device=DEVICE),
        torch.randn(1, 3, 8, generator=gen, device=DEVICE),
    )
    assert rope(x, cos, sin).dtype == ops.rope_ref(x, cos, sin).dtype == torch.float32


# --------------------------------------------------------------------------- gated activation


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "i"), [(1, 3), (21, 70)])
@pytest.mark.usefixtures("poison_empty")
def test_glu_matches_float64(n, i, dtype, activation, gen):
    gate, up = make((n, i), dtype, "strided", gen), make((n, i), dtype, "transposed", gen)
    ref = ACTIVATIONS[activation](gate.double()) * up.double()
    for impl in (glu, ops.glu_ref):
        close(impl(gate, up, activation), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_backward_in_place_over_gate_and_up(dtype, gen):
    """The lean MLP's backward writes dgate over gate and dup over up (halves of one fused buffer
    here), and forms h only when asked."""
    n, i = 13, 40
    packed = make((n, 2 * i), dtype, "contiguous", gen)
    gate, up = packed.chunk(2, dim=-1)
    dh = make((n, i), dtype, "strided", gen)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    h64 = ACTIVATIONS["silu"](g64) * u64
    h64.backward(dh.double())
    for impl in (ops.glu_backward.impls["triton"], ops.glu_backward_ref):
        work = packed.clone()
        g, u = work.chunk(2, dim=-1)
        assert impl(dh, g, u, "silu", g, u, False) is None
        close(g, g64.grad, dtype)
        close(u, u64.grad, dtype)
        work = packed.clone()
        g, u = work.chunk(2, dim=-1)
        close(impl(dh, g, u, "silu", g, u, True), h64.detach(), dtype)


# --------------------------------------------------------------------------- cross-entropy


def ce64(logits: torch.Tensor, targets: torch.Tensor, scale: float, softcap: float | None):
    z64 = logits.double().requires_grad_()
    z = torch.tanh(z64 / softcap) * softcap if softcap is not None else z64
    losses = F.cross_entropy(z, targets, reduction="none", ignore_index=-100)
    (losses.sum() * scale).backward()
    return losses.detach(), z64.grad


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "v"), [(1, 7), (9, 1500), (4, 2049)])
def test_cross_entropy_in_place_matches_float64(n, v, dtype, softcap, gen):
    logits = (3 * torch.randn(n, v, generator=gen)).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    targets[n // 2] = -100  # one ignored row: zero loss, zero gradient
    losses64, grad64 = ce64(logits, targets, 0.3, softcap)
    for impl in (cross_entropy_, ops.cross_entropy_ref):
        z = logits.clone()
        losses = impl(z, targets, torch.tensor([0.3], device=DEVICE), softcap, -100)
        assert losses.dtype == torch.float32 and losses[n // 2] == 0
        torch.testing.assert_close(losses.double(), losses64, rtol=1e-5, atol=1e-5)
        close(z, grad64, dtype)
        assert not z[n // 2].any()


def test_cross_entropy_target_outside_the_vocabulary_gives_nan_not_a_wild_read(gen):
    logits = torch.randn(3, 50, generator=gen, device=DEVICE)
    losses = cross_entropy_(logits.clone(), torch.tensor([1, 50, -7], device=DEVICE), torch.ones(1), None)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1:]).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda z, t, s: cross_entropy_(z.t(), t, s), "contiguous rows"),
        (lambda z, t, s: cross_entropy_(z, t.int(), s), "int64"),
        (lambda z, t, s: cross_entropy_(z, t, s.double()), "one float32"),
        (lambda z, t, s: rms_norm_forward(z, torch.ones(3), 1e-6, 0.0, False), "weight must be 1-D"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, message, gen):
    z, t = torch.randn(4, 4, generator=gen, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=message):
        call(z, t, torch.ones(1, device=DEVICE))


def test_custom_ops_pass_opcheck(gen):
    x, w = torch.randn(5, 12, generator=gen), torch.randn(12, generator=gen)
    _, rstd = library.rms_norm_forward(x, w, 1e-6, 0.0, False)
    cases = [
        (library.rms_norm_forward, (x, w, 1e-6, 1.0, True)),
        (library.rms_norm_backward, (torch.randn(5, 12, generator=gen), x, w, rstd, 0.0, False, True)),
        (library.rms_norm_backward, (torch.randn(5, 12, generator=gen), x, w, rstd, 0.0, False, False)),
        (library.glu, (torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen), "gelu_tanh")),
        (library.glu_backward_, (*torch.randn(3, 5, 8, generator=gen), "silu", True)),
        (library.glu_backward_, (*torch.randn(3, 5, 8, generator=gen), "gelu_tanh", False)),
        (
            library.rope,
            (
                torch.randn(2, 3, 5, 8, generator=gen),
                torch.randn(2, 5, 6, generator=gen),
                torch.randn(2, 5, 6, generator=gen),
                True,
            ),
        ),
        (
            library.cross_entropy_,
            (torch.randn(5, 11, generator=gen), torch.tensor([1, -100, 3, 0, 10]), torch.ones(1), 2.0, -100),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_meta_runs_the_fakes_outputs_only():
    """On the meta device (the accounting's view of a card) the ops allocate their outputs alone."""
    x, w = torch.empty(4, 8, device="meta", dtype=torch.bfloat16), torch.empty(8, device="meta")
    y, rstd = library.rms_norm_forward(x, w, 1e-6, 0.0, False)
    assert y.dtype == torch.float32 and rstd.shape == (4,)
    z = torch.empty(4, 10, device="meta", dtype=torch.bfloat16)
    targets, scale = torch.empty(4, dtype=torch.int64, device="meta"), torch.ones(1, device="meta")
    losses = library.cross_entropy_(z, targets, scale, None, -100)
    assert losses.shape == (4,) and losses.dtype == torch.float32


# --------------------------------------------------------------------------- whole models


@contextlib.contextmanager
def kernels_on(backend: str):
    with contextlib.ExitStack() as stack:
        for name in LEAN_OPS:
            stack.enter_context(ops.use_backend(name, backend))
        yield


@pytest.mark.parametrize(
    ("family", "method", "recompute"),
    [("llama", "floor", 0.0), ("llama", "paca", 0.0), ("gemma", "full", 0.0), ("gemma2", "paca", 0.0),
     ("phi3", "s2ft", 0.0), ("llama", "paca", 1.0)],
)  # fmt: skip
def test_lean_on_the_kernel_path_gives_the_plain_loss_and_gradients(family, method, recompute):
    """Every lean op on Triton (interpreted on CPU): SiLU and GELU-tanh, both norm flavours, soft-capped
    logits, a fused gate_up; loss and every trained gradient within float32 tolerance of the plain
    model, and the lean modules really took the kernel path (the stand-ins know their activation); with
    every MLP recomputing its up projection too."""
    if DEVICE.type != "cpu":
        pytest.skip("the GPU run is test_lean_matches_plain_on_cuda")
    reference = prepared(family, method)
    lean = slimtune.lean(copy.deepcopy(reference), recompute=recompute)
    assert all(m.kind in ("silu", "gelu_tanh") for m in lean.modules() if isinstance(m, LeanGatedMLP))
    assert any(isinstance(m, LeanRMSNorm) for m in lean.modules())
    assert any(isinstance(m, LeanAttention) for m in lean.modules())
    ids = make_batch()
    embeds = []
    for model, backend in ((reference, "torch"), (lean, "triton")):
        with kernels_on(backend):
            x = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # the input gradient too
            loss = model(inputs_embeds=x, labels=ids).loss
            loss.backward()
        embeds.append((loss.detach(), x.grad))
    assert ops.glu.choose(torch.device("cpu"))[0] == "torch"  # use_backend undone
    (loss_ref, dx_ref), (loss, dx) = embeds
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx / dx_ref.abs().max(), dx_ref / dx_ref.abs().max(), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(trainable(reference).items(), trainable(lean).values(), strict=True):
        if a.grad is None:  # the input embeddings, bypassed by inputs_embeds
            assert b.grad is None, name
            continue
        scale = a.grad.abs().max().clamp_min(1e-8)
        torch.testing.assert_close(b.grad / scale, a.grad / scale, rtol=1e-4, atol=1e-5, msg=name)


def test_a_second_backward_on_the_kernel_path_fails_by_name():
    """The kernel path writes the MLP's gradients over its saved gate and up: a second backward through
    the same graph (retain_graph) must raise, not reuse overwritten tensors."""
    if DEVICE.type != "cpu":
        pytest.skip("the CPU interpreter run")
    model = slimtune.lean(prepared("llama", "floor"))
    ids = make_batch()
    with kernels_on("triton"):
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# --------------------------------------------------------------------------- GPU: bf16, realistic shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_lean_kernels_at_tinyllama_shapes(dtype, gen):
    """One block's worth of TinyLlama rows (4096 tokens, hidden 2048, intermediate 5632, 32 heads of
    64, vocabulary 32000 in chunks of 1024) against float64 math."""
    n, d, i = 4096, 2048, 5632
    x, dy = make((n, d), dtype, "contiguous", gen), make((n, d), dtype, "contiguous", gen)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(DEVICE, dtype)
    x64, w64, _, y64 = norm64(x, w, 1e-5, False)
    y64.backward(dy.double())
    y, rstd = rms_norm_forward(x, w, 1e-5, 0.0, False)
    close(y, y64.detach(), dtype)
    dx, dw = rms_norm_backward(dy, x, w, rstd, 0.0, False, True)
    close(dx, x64.grad, dtype)
    close(dw.to(dtype), w64.grad, dtype)
    gate, up = make((n, i), dtype, "contiguous", gen), make((n, i), dtype, "contiguous", gen)
    close(glu(gate, up, "silu"), ACTIVATIONS["silu"](gate.double()) * up.double(), dtype)
    q = torch.randn(2, 2048, 32, 64, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    cos, sin = (torch.randn(1, 2048, 64, generator=gen).to(DEVICE, dtype) for _ in range(2))
    ref = q.double() * cos.double().unsqueeze(1) + rotate_half(q.double()) * sin.double().unsqueeze(1)
    close(rope(q, cos, sin).reshape(-1, 64), ref.reshape(-1, 64), dtype)
    logits = (3 * torch.randn(1024, 32000, generator=gen)).to(DEVICE, dtype)
    targets = torch.randint(0, 32000, (1024,), generator=gen, device=DEVICE)
    losses64, grad64 = ce64(logits, targets, 1 / 1024, None)
    losses = cross_entropy_(logits, targets, torch.full((1,), 1 / 1024, device=DEVICE), None)
    torch.testing.assert_close(losses.double(), losses64, rtol=2e-2, atol=2e-2)
    close(logits, grad64, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["floor", "paca", "lora"])
def test_gpu_lean_bf16_step_matches_plain(method):
    """A bf16 Llama on the card: lean mode's loss and gradients (every kernel on Triton) within bf16
    tolerance of the plain model's."""
    reference = prepared("llama", method).to(DEVICE, torch.bfloat16)
    lean = slimtune.lean(copy.deepcopy(reference))
    assert ops.rope.choose(DEVICE)[0] == "triton"
    ids = make_batch().to(DEVICE)
    losses, grads = [], []
    for model in (reference, lean):
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        losses.append(loss.float())
        grads.append([x.grad, *(p.grad for p in trainable(model).values() if p.grad is not None)])
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads[0], grads[1], strict=True):
        scale = a.float().abs().max().clamp_min(1e-6)
        torch.testing.assert_close(b.float() / scale, a.float() / scale, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["paca", "lora"])
def test_gpu_liger_then_slimtune_gives_the_plain_gradients(method):
    """Users who patch with Liger-Kernel first (`apply_liger_kernel_to_llama()`, module-wide) and then
    apply a slimtune method get the plain model's loss and trained gradients (liger-kernel travels to
    the card as a wheel; where it is missing this test fails, it is not skipped)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    reference = prepared("llama", method).to(DEVICE, torch.float32)
    ids = make_batch().to(DEVICE)
    reference(input_ids=ids, labels=ids).loss.backward()
    apply_liger_kernel_to_llama()  # patches transformers' Llama classes: models built from now on
    try:
        patched = prepared("llama", method).to(DEVICE, torch.float32)
        loss = patched(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        import importlib

        import transformers.models.llama.modeling_llama as modeling

        importlib.reload(modeling)  # the other tests get transformers' own Llama again
    torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids).loss, rtol=1e-3, atol=1e-3)
    for (name, a), b in zip(trainable(reference).items(), trainable(patched).values(), strict=True):
        scale = a.grad.abs().max().clamp_min(1e-8)
        torch.testing.assert_close(b.grad / scale, a.grad / scale, rtol=1e-2, atol=1e-3, msg=name)
