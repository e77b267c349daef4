"""Triton LoRA kernels (interpreter on CPU) and their PyTorch references against float64 math.

bf16 runs only on a GPU (the interpreter's bf16 tl.dot is wrong); shapes are small and ragged.
"""

from __future__ import annotations

import pytest
import torch
from slimtune import ops
from slimtune.triton_kernels import glu_backward, glu_down, lora_input_grad, lora_linear, matmul_sum
from test_triton_kernels import DEVICE, LAYOUTS, make

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the reference's scale: fp32 accumulation, one rounding to `dtype`."""
    assert got.dtype == dtype and got.shape == ref.shape
    scale = ref.abs().max().clamp_min(1)
    torch.testing.assert_close(got.double() / scale, ref / scale, rtol=TOL[dtype], atol=TOL[dtype])


# --------------------------------------------------------------------------- matmul_sum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("n", "m", "ks"), [(1, 3, (5,)), (37, 29, (45, 5)), (20, 70, (33, 1, 17)), (65, 9, (7, 40, 2, 18))]
)
def test_matmul_sum(n, m, ks, bias, dtype, gen):
    terms = [
        (make((n, k), dtype, LAYOUTS[i % 3], gen), make((k, m), dtype, LAYOUTS[(i + 1) % 3], gen))
        for i, k in enumerate(ks)
    ]
    b = make((1, m), dtype, "contiguous", gen)[0] if bias else None
    ref = sum(p.double() @ q.double() for p, q in terms) + (b.double() if bias else 0)
    close(matmul_sum(terms, b), ref, dtype)
    close(matmul_sum(terms, b, out_dtype=torch.float32), ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "m", "r"), [(37, 45, 29, 5), (16, 64, 88, 16), (3, 8, 130, 1)])
def test_lora_linear_and_input_grad_match_their_references(n, k, m, r, dtype, gen):
    x, weight = make((n, k), dtype, "contiguous", gen), make((m, k), dtype, "strided", gen)
    u, b = make((n, r), dtype, "transposed", gen), make((m, r), dtype, "contiguous", gen)
    bias = make((1, m), dtype, "contiguous", gen)[0]
    ref = x.double() @ weight.double().T + bias.double() + u.double() @ b.double().T
    close(lora_linear(x, weight, bias, u, b), ref, dtype)
    close(ops.lora_linear_ref(x, weight, bias, u, b), ref, dtype)
    close(ops.lora_linear_blas(x, weight, bias, u, b), ref, dtype)
    close(ops.lora_linear_blas(x, weight, None, u, b), ref - bias.double(), dtype)

    dys = [make((n, mi), dtype, "contiguous", gen) for mi in (m, 7, 13)]
    weights = [make((mi, k), dtype, "contiguous", gen) for mi in (m, 7, 13)]
    g, a = make((n, 3 * r), dtype, "contiguous", gen), make((3 * r, k), dtype, "strided", gen)
    ref = g.double() @ a.double() + sum(dy.double() @ w.double() for dy, w in zip(dys, weights, strict=True))
    close(lora_input_grad(g, a, dys, weights), ref, dtype)
    close(ops.lora_input_grad_ref(g, a, dys, weights), ref, dtype)
    close(ops.lora_input_grad_blas(g, a, dys, weights), ref, dtype)


# --------------------------------------------------------------------------- gated MLP


def gate_up(n: int, i: int, dtype: torch.dtype, fused: bool, gen: torch.Generator):
    """gate and up as two tensors, or as the halves of one (N, 2I) tensor (Phi-3's gate_up_proj)."""
    if fused:
        return make((n, 2 * i), dtype, "contiguous", gen).chunk(2, dim=-1)
    return make((n, i), dtype, "contiguous", gen), make((n, i), dtype, "transposed", gen)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["gate,up", "gate_up"])
@pytest.mark.parametrize(("n", "i", "r"), [(1, 5, 1), (37, 70, 5), (20, 33, 16), (3, 17, 130)])
def test_glu_down(n, i, r, fused, dtype, activation, gen):
    gate, up = gate_up(n, i, dtype, fused, gen)
    a = make((r, i), dtype, "contiguous", gen)
    h_ref = ACTIVATIONS[activation](gate.double()) * up.double()
    for impl in (glu_down, ops.glu_down_ref):
        h, u = impl(gate, up, a, activation)
        close(h, h_ref, dtype)
        close(u, h.double() @ a.double().T, dtype)  # u is the product of the rounded h


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["gate,up", "gate_up"])
@pytest.mark.parametrize(("n", "i"), [(1, 5), (37, 70)])
def test_glu_backward(n, i, fused, dtype, activation, gen):
    gate, up = gate_up(n, i, dtype, fused, gen)
    dh = make((n, i), dtype, "strided", gen)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    h_ref = ACTIVATIONS[activation](g64) * u64
    h_ref.backward(dh.double())
    for impl in (glu_backward, ops.glu_backward_ref):
        out = torch.full((n, 2 * i), float("nan"), dtype=dtype, device=DEVICE)  # written in place, as halves
        dgate, dup = out.chunk(2, dim=-1)
        h = impl(dh, gate, up, activation, dgate, dup)
        close(h, h_ref.detach(), dtype)
        close(dgate, g64.grad, dtype)
        close(dup, u64.grad, dtype)


def test_empty_shapes(gen):
    x = make((0, 5), torch.float32, "contiguous", gen)
    assert matmul_sum([(x, make((5, 3), torch.float32, "contiguous", gen))]).shape == (0, 3)
    gate = make((0, 4), torch.float32, "contiguous", gen)
    h, u = glu_down(gate, gate, make((2, 4), torch.float32, "contiguous", gen), "silu")
    assert h.shape == (0, 4) and u.shape == (0, 2)
    wide = make((3, 0), torch.float32, "contiguous", gen)
    assert torch.equal(
        glu_down(wide, wide, make((2, 0), torch.float32, "contiguous", gen), "gelu")[1],
        torch.zeros(3, 2, device=DEVICE),
    )


def _bad_calls() -> list:
    f32 = {"device": DEVICE, "dtype": torch.float32}
    x, w = torch.zeros(4, 5, **f32), torch.zeros(5, 3, **f32)
    g = torch.zeros(4, 6, **f32)
    calls = [
        ("no terms", ValueError, lambda: matmul_sum([])),
        ("five terms", ValueError, lambda: matmul_sum([(x, w)] * 5)),
        ("inner mismatch", ValueError, lambda: matmul_sum([(x, w[:4])])),
        ("rows mismatch", ValueError, lambda: matmul_sum([(x, w), (x[:3], w)])),
        ("dtype mismatch", TypeError, lambda: matmul_sum([(x, w.half())])),
        ("bias shape", ValueError, lambda: matmul_sum([(x, w)], torch.zeros(4, **f32))),
        ("x 1-D", ValueError, lambda: matmul_sum([(x[0], w)])),
        ("glu shapes", ValueError, lambda: glu_down(g, g[:, :5], torch.zeros(2, 6, **f32), "silu")),
        ("glu a width", ValueError, lambda: glu_down(g, g, torch.zeros(2, 5, **f32), "silu")),
        ("glu activation", ValueError, lambda: glu_down(g, g, torch.zeros(2, 6, **f32), "relu")),
        ("glu grad shape", ValueError, lambda: glu_backward(g[:3], g, g, "silu", g.clone(), g.clone())),
    ]
    return [pytest.param(error, call, id=name) for name, error, call in calls]


@pytest.mark.parametrize(("error", "call"), _bad_calls())
def test_bad_inputs_raise(error, call):
    with pytest.raises(error):
        call()


# --------------------------------------------------------------------------- GPU, realistic shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_up_proj_shapes(dtype, gen):
    """TinyLlama's up_proj with r=16 and its SwiGLU, against float32 math."""
    n, k, m, r = 4096, 2048, 5632, 16
    x, weight = make((n, k), dtype, "contiguous", gen), make((m, k), dtype, "contiguous", gen) * 0.02
    a, b = make((r, k), dtype, "contiguous", gen) * 0.02, make((m, r), dtype, "contiguous", gen)
    u = x @ a.T
    ref = x.float() @ weight.float().T + u.float() @ b.float().T
    close(lora_linear(x, weight, None, u, b), ref.double(), dtype)
    dy = make((n, m), dtype, "contiguous", gen)
    g = dy @ b
    ref = dy.float() @ weight.float() + g.float() @ a.float()
    close(lora_input_grad(g, a, [dy], [weight]), ref.double(), dtype)
    gate, up = make((n, m), dtype, "contiguous", gen), make((n, m), dtype, "contiguous", gen)
    a_down = make((r, m), dtype, "contiguous", gen) * 0.02
    h, u_down = glu_down(gate, up, a_down, "silu")
    h_ref = torch.nn.functional.silu(gate.float()) * up.float()
    close(h, h_ref.double(), dtype)
    close(u_down, (h.float() @ a_down.float().T).double(), dtype)
    # SwiGLU's backward at the same shape: dh into dgate and dup (written as halves of one buffer).
    dh = make((n, m), dtype, "contiguous", gen)
    g32, u32 = gate.float().requires_grad_(), up.float().requires_grad_()
    (torch.nn.functional.silu(g32) * u32).backward(dh.float())
    out = torch.full((n, 2 * m), float("nan"), dtype=dtype, device=gate.device)
    dgate, dup = out.chunk(2, dim=-1)
    close(glu_backward(dh, gate, up, "silu", dgate, dup), h_ref.double(), dtype)
    close(dgate, g32.grad.double(), dtype)
    close(dup, u32.grad.double(), dtype)
