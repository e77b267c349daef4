"""Triton PaCA column kernels against plain PyTorch references.

Without CUDA, conftest.py switches Triton to its interpreter, so shapes here are
small and odd (ragged tiles everywhere). bf16 is checked only on a GPU: the
interpreter's tl.dot is wrong for bf16 operands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:
    from slimtune.triton_kernels import column_grad, gather_columns, scatter_columns
except ImportError:  # source checkout without the installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from triton_kernels import column_grad, gather_columns, scatter_columns

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided"]
ORDERS = ["sorted", "unsorted"]
NAN = float("nan")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN-fill every float tensor from torch.empty so unwritten outputs fail the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(NAN)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def make(shape: tuple[int, int], dtype: torch.dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    """Random (rows, cols) tensor on DEVICE with the requested memory layout."""
    rows, cols = shape
    if layout == "contiguous":
        base = torch.randn(rows, cols, generator=gen)
    elif layout == "transposed":
        base = torch.randn(cols, rows, generator=gen)
    else:
        base = torch.randn(2 * rows, 2 * cols, generator=gen)
    base = base.to(device=DEVICE, dtype=dtype)
    if layout == "transposed":
        return base.t()
    if layout == "strided":
        return base[::2, 1::2]
    return base


def make_idx(k: int, r: int, order: str, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randperm(k, generator=gen)[:r]
    if order == "sorted":
        idx = idx.sort().values
    return idx.to(DEVICE)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-exact comparison (NaN-safe, distinguishes -0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def column_cases(row_counts: tuple[int, ...] = (1, 17, 130)) -> list[tuple[int, int, int]]:
    """(rows, K, r) with K in {5, 33, 70}, r in {1, 3, 17, K}, r <= K."""
    return [(rows, k, r) for rows in row_counts for k in (5, 33, 70) for r in sorted({1, 3, 17, k}) if r <= k]


# --------------------------------------------------------------------------- gather


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "r"), column_cases())
def test_gather_columns(n, k, r, dtype, layout, order, gen, poison_empty):
    x = make((n, k), dtype, layout, gen)
    idx = make_idx(k, r, order, gen)
    got = gather_columns(x, idx)
    assert got.shape == (n, r) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(bits(got), bits(x[:, idx]))


@pytest.mark.parametrize("out_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize(("n", "k", "r"), [(17, 33, 17), (130, 70, 3)])
def test_gather_columns_into_poisoned_out(n, k, r, out_layout, gen):
    x = make((n, k), torch.float32, "strided", gen)
    idx = make_idx(k, r, "unsorted", gen)
    out = make((n, r), torch.float32, out_layout, gen).fill_(NAN)
    assert gather_columns(x, idx, out=out) is out
    assert torch.equal(out, x[:, idx])


# --------------------------------------------------------------------------- scatter

SCATTER_LAYOUTS = [("contiguous", "contiguous"), ("transposed", "strided"), ("strided", "transposed")]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("w_layout", "c_layout"), SCATTER_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "r"), column_cases((3, 40)))
def test_scatter_columns(m, k, r, dtype, w_layout, c_layout, order, gen):
    weight = make((m, k), dtype, w_layout, gen)
    idx = make_idx(k, r, order, gen)
    cols = make((m, r), dtype, c_layout, gen)
    expected = weight.clone()
    expected[:, idx] = cols
    weight[:, idx] = NAN  # poison the target columns
    scatter_columns(weight, idx, cols)
    # Untouched columns keep their bits; touched ones hold exactly `cols`.
    assert torch.equal(bits(weight), bits(expected))


def test_scatter_columns_rounds_to_weight_dtype(gen):
    weight = make((40, 33), torch.float16, "contiguous", gen)
    idx = make_idx(33, 17, "unsorted", gen)
    cols = make((40, 17), torch.float32, "transposed", gen)
    expected = weight.clone()
    expected[:, idx] = cols.to(torch.float16)
    scatter_columns(weight, idx, cols)
    assert torch.equal(bits(weight), bits(expected))


# --------------------------------------------------------------------------- column_grad


def check_grad(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare against a float64 reference: fp32 accumulation, then rounding to ``got.dtype``."""
    assert got.dtype == dtype and got.shape == ref.shape
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


GRAD_CASES = [(n, m, k, r) for m in (3, 40) for (n, k, r) in column_cases()]
# Each shape gets one (dy, x) layout pair and idx order, cycling, to keep the run short.
GRAD_PARAMS = [
    (*case, LAYOUTS[i % 3], LAYOUTS[(i // 3) % 3], ORDERS[i % 2]) for i, case in enumerate(GRAD_CASES)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m", "k", "r", "dy_layout", "x_layout", "order"), GRAD_PARAMS)
def test_column_grad_through_index(n, m, k, r, dy_layout, x_layout, order, dtype, gen, poison_empty):
    dy = make((n, m), dtype, dy_layout, gen)
    x = make((n, k), dtype, x_layout, gen)
    idx = make_idx(k, r, order, gen)
    ref = dy.double().T @ x.double()[:, idx]
    check_grad(column_grad(dy, x, idx), ref, dtype)
    if dtype != torch.float32:
        check_grad(column_grad(dy, x, idx, out_dtype=torch.float32), ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize(("n", "m", "r"), [(1, 40, 3), (17, 3, 17), (130, 40, 1), (130, 3, 70)])
def test_column_grad_compact(n, m, r, x_layout, dtype, gen, poison_empty):
    dy = make((n, m), dtype, "transposed", gen)
    x = make((n, r), dtype, x_layout, gen)
    check_grad(column_grad(dy, x), dy.double().T @ x.double(), dtype)


def test_column_grad_split_reduction_is_deterministic(gen, poison_empty):
    # Many tokens, one small output tile: the launch splits N and reduces in a second pass.
    n, m, k, r = 130 if DEVICE.type == "cpu" else 8192, 3, 33, 3
    module = sys.modules[column_grad.__module__]
    assert module._launch_config(n, m, r, torch.float32, DEVICE)["splits"] > 1
    dy = make((n, m), torch.float32, "contiguous", gen)
    x = make((n, k), torch.float32, "contiguous", gen)
    idx = make_idx(k, r, "unsorted", gen)
    first = column_grad(dy, x, idx)
    check_grad(first, dy.double().T @ x.double()[:, idx], torch.float32)
    assert torch.equal(bits(column_grad(dy, x, idx)), bits(first))


def test_empty_shapes(gen):
    x = make((0, 5), torch.float32, "contiguous", gen)
    idx = make_idx(5, 3, "sorted", gen)
    assert gather_columns(x, idx).shape == (0, 3)
    dy = make((0, 4), torch.float32, "contiguous", gen)
    assert torch.equal(column_grad(dy, x, idx), torch.zeros(4, 3, device=DEVICE))
    weight = make((4, 5), torch.float32, "contiguous", gen)
    before = weight.clone()
    scatter_columns(weight, idx[:0], weight[:, :0])
    assert torch.equal(weight, before)


# --------------------------------------------------------------------------- validation


def _bad_calls() -> list:
    """One pytest.param(error, call) per malformed call, named after what is wrong."""
    f32 = {"device": DEVICE, "dtype": torch.float32}
    x = torch.zeros(6, 5, **f32)
    dy = torch.zeros(6, 4, **f32)
    w = torch.zeros(4, 5, **f32)
    idx = torch.tensor([0, 3], device=DEVICE)
    meta_x = torch.zeros(6, 5, device="meta")
    calls = [
        ("gather x 1-D", ValueError, lambda: gather_columns(x[0], idx)),
        ("gather x float64", TypeError, lambda: gather_columns(x.double(), idx)),
        ("gather x int", TypeError, lambda: gather_columns(x.long(), idx)),
        ("gather x list", TypeError, lambda: gather_columns([[0.0]], idx)),
        ("gather idx int32", TypeError, lambda: gather_columns(x, idx.int())),
        ("gather idx 2-D", ValueError, lambda: gather_columns(x, idx[None])),
        ("gather idx list", TypeError, lambda: gather_columns(x, [0, 3])),
        ("gather out shape", ValueError, lambda: gather_columns(x, idx, out=torch.empty(6, 3, **f32))),
        ("gather out dtype", TypeError, lambda: gather_columns(x, idx, out=x[:, :2].half())),
        ("gather idx device", ValueError, lambda: gather_columns(x, idx.to("meta"))),
        ("gather meta device", ValueError, lambda: gather_columns(meta_x, idx.to("meta"))),
        ("scatter cols rows", ValueError, lambda: scatter_columns(w, idx, torch.zeros(3, 2, **f32))),
        ("scatter cols width", ValueError, lambda: scatter_columns(w, idx, torch.zeros(4, 3, **f32))),
        ("scatter weight 3-D", ValueError, lambda: scatter_columns(w[None], idx, torch.zeros(4, 2, **f32))),
        ("scatter idx int32", TypeError, lambda: scatter_columns(w, idx.int(), torch.zeros(4, 2, **f32))),
        ("scatter cols int", TypeError, lambda: scatter_columns(w, idx, w[:, :2].int())),
        ("grad rows mismatch", ValueError, lambda: column_grad(dy[:5], x, idx)),
        ("grad dtype mismatch", TypeError, lambda: column_grad(dy.half(), x, idx)),
        ("grad out_dtype", TypeError, lambda: column_grad(dy, x, idx, out_dtype=torch.int32)),
        ("grad idx float", TypeError, lambda: column_grad(dy, x, idx.float())),
        ("grad x 1-D", ValueError, lambda: column_grad(dy, x[:, 0], idx)),
        ("grad device mismatch", ValueError, lambda: column_grad(dy, meta_x, None)),
    ]
    return [pytest.param(error, call, id=name) for name, error, call in calls]


@pytest.mark.parametrize(("error", "call"), _bad_calls())
def test_bad_inputs_raise(error, call):
    with pytest.raises(error):
        call()


# --------------------------------------------------------------------------- GPU, realistic shapes


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_realistic_shapes(dtype, layout, gen):
    n, k, m, r = 4096, 2048, 5632, 64
    x = make((n, k), dtype, layout, gen)
    dy = make((n, m), dtype, layout, gen)
    idx = make_idx(k, r, "unsorted", gen)

    compact = gather_columns(x, idx)
    assert torch.equal(bits(compact), bits(x[:, idx]))

    ref = dy.double().T @ compact.double()
    got = column_grad(dy, x, idx)
    check_grad(got, ref, dtype)
    check_grad(column_grad(dy, x, idx, out_dtype=torch.float32), ref, torch.float32)
    # Same tiling and reduction order whether x is read through idx or compact: bit-equal.
    assert torch.equal(bits(column_grad(dy, compact)), bits(got))
    assert torch.equal(bits(column_grad(dy, x, idx)), bits(got))

    weight = make((m, k), dtype, layout, gen)
    cols = make((m, r), dtype, "contiguous", gen)
    expected = weight.clone()
    expected[:, idx] = cols
    scatter_columns(weight, idx, cols)
    assert torch.equal(bits(weight), bits(expected))


# --------------------------------------------------------------------------- interpreter on NumPy >= 2.4


def _old_patch_lang_tensor(tensor, scope):  # the shape of Triton 3.6's interpreter patch
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def test_interpreter_guard_squeezes_one_element_blocks(monkeypatch):
    """Triton 3.6's interpreter makes an index of a (1,)-shaped block with int(array), which NumPy 2.4
    refuses; the guard installs the squeeze later Tritons do, once, and leaves a fixed Triton alone."""
    import numpy as np
    from slimtune.triton_kernels import _interpreter
    from triton.runtime import interpreter

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Block:
        def __init__(self, data):
            self.handle = type("Handle", (), {"data": data})()

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    assert _interpreter.squeeze_block_indices()
    assert not _interpreter.squeeze_block_indices()  # installed once
    interpreter._patch_lang_tensor(Block, Scope())
    assert list(range(Block(np.array([2], dtype=np.int32)), 8, 3)) == [2, 5]
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", lambda tensor, scope: None)
    assert not _interpreter.squeeze_block_indices()  # a Triton without the old pattern is left alone
