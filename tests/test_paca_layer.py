"""PaCALinear and its autograd function against plain PyTorch, on every backend available here."""

from __future__ import annotations

import contextlib

import pytest
import slimtune
import torch
from slimtune import ops
from slimtune.layers import PaCALinear
from slimtune.methods.paca import column_index
from torch import nn

CPU_BACKENDS = ["torch", "cpp", "triton"]  # triton runs under TRITON_INTERPRET=1 (tests/conftest.py)
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


@contextlib.contextmanager
def forced(backend: str):
    """Route the layer's column ops to one backend (column_grad has no C++ kernel: torch there)."""
    with contextlib.ExitStack() as stack:
        for op in ("gather_columns", "scatter_columns", "column_grad"):
            if backend in ops.OPS[op].impls:
                stack.enter_context(ops.use_backend(op, backend))
        yield


def make_layer(in_features, out_features, r, bias, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=generator, dtype=torch.float32))
        if bias:
            base.bias.copy_(torch.randn(out_features, generator=generator))
    reference = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    reference.load_state_dict(base.state_dict())
    index = column_index("layer", in_features, r, seed)
    return PaCALinear(base, index), reference


INPUTS = {
    "2d": lambda n, k, g, dt: torch.randn(n, k, generator=g).to(dt),
    "3d": lambda n, k, g, dt: torch.randn(2, n, k, generator=g).to(dt),
    "4d": lambda n, k, g, dt: torch.randn(2, 3, n, k, generator=g).to(dt),
    "transposed": lambda n, k, g, dt: torch.randn(k, n, generator=g).to(dt).t(),
    "strided": lambda n, k, g, dt: torch.randn(2, n, 2 * k, generator=g).to(dt)[..., ::2],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 23, 5), (8, 70, 1), (19, 33, 33)], ids=["odd", "r1", "r=in"])
@pytest.mark.parametrize("layout", sorted(INPUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_dense_linear(backend, dtype, shape, layout, bias):
    in_features, out_features, r = shape
    layer, reference = make_layer(in_features, out_features, r, bias, dtype)
    x, x_ref = (INPUTS[layout](7, in_features, torch.Generator().manual_seed(1), dtype) for _ in range(2))
    x.requires_grad_(True)
    x_ref.requires_grad_(True)  # same values and strides: the dense GEMM path must be the same
    dy = torch.randn(*x.shape[:-1], out_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    with forced(backend):
        y = layer(x)
        y.backward(dy)
    reference.bias.requires_grad_(False) if bias else None
    y_ref = reference(x_ref)
    y_ref.backward(dy)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=atol)
    expected = reference.weight.grad[:, layer.paca_index]
    torch.testing.assert_close(layer.paca_columns.grad, expected, rtol=rtol, atol=atol * 10)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_backward_saves_only_the_selected_columns():
    layer, _ = make_layer(64, 48, 4, True, torch.float32)
    x = torch.randn(5, 9, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert [tuple(t.shape) for t in saved] == [(45, 4), (4,)], "only x[..., idx] (compact) may be saved"
    assert saved[1].data_ptr() == layer.paca_index.data_ptr(), "besides, only the layer's own index buffer"


def test_bf16_autocast_runs_in_bf16_and_grads_land_in_param_dtype():
    layer, reference = make_layer(32, 24, 4, True, torch.float32)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = reference(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    y.float().sum().backward()
    assert layer.paca_columns.grad.dtype == torch.float32


def test_frozen_input_gets_no_gradient_work():
    layer, _ = make_layer(16, 8, 3, False, torch.float32)
    x = torch.randn(4, 16)
    layer(x).sum().backward()
    assert layer.paca_columns.grad is not None and x.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS[:2])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_partial_adamw_matches_torch_adamw_and_keeps_weight_in_sync(backend, weight_decay):
    layer, _ = make_layer(40, 30, 7, False, torch.float32)
    columns = layer.paca_columns.detach().clone().requires_grad_(True)
    untouched = layer.weight.detach().clone()
    ours = slimtune.PartialAdamW([layer.paca_columns], lr=0.05, weight_decay=weight_decay, layers=[layer])
    theirs = torch.optim.AdamW([columns], lr=0.05, weight_decay=weight_decay, foreach=False)
    generator = torch.Generator().manual_seed(3)
    with ops.use_backend("partial_adamw", backend):
        for _ in range(5):
            grad = torch.randn(columns.shape, generator=generator)
            layer.paca_columns.grad, columns.grad = grad.clone(), grad.clone()
            ours.step()
            theirs.step()
            torch.testing.assert_close(layer.paca_columns, columns, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(layer.weight[:, layer.paca_index], columns, rtol=1e-6, atol=1e-7)
            untouched[:, layer.paca_index] = layer.paca_columns.detach()
            assert torch.equal(layer.weight, untouched), "only the trained columns of the weight may change"


def test_index_is_sorted_unique_and_in_range():
    index = column_index("model.layers.3.mlp.down_proj", 97, 13, seed=5)
    assert index.dtype == torch.long and index.shape == (13,)
    assert torch.equal(index, index.unique(sorted=True)) and int(index.min()) >= 0 and int(index.max()) < 97


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cuda_layer_matches_dense_linear(dtype, backend):
    torch.manual_seed(0)
    layer, reference = make_layer(2048, 1408, 64, True, dtype)
    layer, reference = layer.cuda(), reference.cuda()
    x = torch.randn(4, 512, 2048, device="cuda", dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(4, 512, 1408, device="cuda", dtype=dtype)
    with forced(backend):
        layer(x).backward(dy)
    reference.bias.requires_grad_(False)
    reference(x_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2)
    expected = reference.weight.grad[:, layer.paca_index].float()
    err = (layer.paca_columns.grad.float() - expected).norm() / expected.norm()
    assert err < 1e-2
