"""slimtune._C kernels through slimtune._ext against plain PyTorch.

The C++ CPU kernels are the twins of the CUDA kernels (same per-element math), so these CPU
tests are what CI checks; the same cases run on the CUDA kernels when a GPU is present.
A missing extension fails every test unless the install used SLIMTUNE_BUILD_EXT=0.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from slimtune import _ext
from slimtune.ops import AdamWStep
from torch import Tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "step2"]
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_GPU])]
SHAPES = [(n, k, r) for n in (1, 7, 130) for k in (5, 33, 257) for r in (1, 3, k)]


@pytest.fixture(autouse=True)
def _extension_built() -> None:
    """Skip only for a deliberate pure-Python install; a broken build must fail loudly."""
    if _ext.available():
        return
    if os.environ.get("SLIMTUNE_BUILD_EXT") == "0":
        pytest.skip(f"slimtune._C unavailable: {_ext.load_error()}")
    pytest.fail(f"slimtune._C failed to load: {_ext.load_error()}")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.param == "cuda" and not _ext.cuda_compiled():
        if os.environ.get("SLIMTUNE_WITH_CUDA") == "0":
            pytest.skip("slimtune._C built CPU-only (SLIMTUNE_WITH_CUDA=0)")
        pytest.fail("a GPU is present but slimtune._C has no CUDA kernels")
    return torch.device(request.param)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix(rows: int, cols: int, layout: str, dtype: torch.dtype, device: torch.device, gen) -> Tensor:
    """Random (rows, cols) matrix, contiguous or a non-contiguous view of a larger buffer."""
    shape = {"contiguous": (rows, cols), "transposed": (cols, rows), "step2": (rows, 2 * cols)}[layout]
    base = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    return {"contiguous": base, "transposed": base.t(), "step2": base[:, ::2]}[layout]


def _index(k: int, r: int, order: str, gen, device: torch.device) -> Tensor:
    idx = torch.randperm(k, generator=gen)[:r]
    return (idx.sort().values if order == "sorted" else idx).to(device)


# ---- gather / scatter ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k", "r"), SHAPES)
def test_gather_columns(device, n, k, r, dtype, layout, order) -> None:
    gen = _gen(n * 1000 + k * 10 + r)
    x = _matrix(n, k, layout, dtype, device, gen)
    idx = _index(k, r, order, gen, device)
    out = torch.full((n, r), float("nan"), dtype=dtype, device=device)
    assert _ext.gather_columns(x, idx, out) is out
    assert torch.equal(out, x[:, idx])
    fresh = _ext.gather_columns(x, idx)
    assert fresh.is_contiguous() and fresh.dtype == dtype and fresh.device == x.device
    assert torch.equal(fresh, x[:, idx])


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "k", "r"), SHAPES)
def test_scatter_columns(device, m, k, r, dtype, layout, order) -> None:
    gen = _gen(m * 1000 + k * 10 + r + 1)
    sentinel = -12345.0
    # weight is a strided view into a poisoned buffer: nothing outside weight[:, idx] may change.
    buffer = torch.full((m, 2 * k), sentinel, dtype=dtype, device=device)
    weight = buffer[:, ::2] if layout == "step2" else buffer[:, :k]
    if layout == "transposed":
        buffer = torch.full((2 * k, m), sentinel, dtype=dtype, device=device)
        weight = buffer[:k].t()
    weight.copy_(torch.randn(m, k, generator=gen))
    cols = _matrix(m, r, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3], dtype, device, gen)
    idx = _index(k, r, order, gen, device)
    expected_buffer = buffer.clone()
    expected = weight.clone()
    expected[:, idx] = cols
    _ext.scatter_columns(weight, idx, cols)
    assert torch.equal(weight, expected)
    outside = torch.ones_like(buffer, dtype=torch.bool)
    if layout == "transposed":
        outside[:k] = False
    elif layout == "step2":
        outside[:, ::2] = False
    else:
        outside[:, :k] = False
    assert torch.equal(buffer[outside], expected_buffer[outside])


def test_empty_columns(device) -> None:
    x = torch.randn(4, 6, device=device)
    idx = torch.empty(0, dtype=torch.int64, device=device)
    assert _ext.gather_columns(x, idx).shape == (4, 0)
    before = x.clone()
    _ext.scatter_columns(x, idx, torch.empty(4, 0, device=device))
    assert torch.equal(x, before)


@pytest.mark.gpu
@NO_GPU
def test_gather_on_side_stream() -> None:
    if not _ext.cuda_compiled():
        pytest.skip("slimtune._C built without CUDA")
    x = torch.randn(513, 300, device="cuda")
    idx = torch.randperm(300, device="cuda")[:77]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = _ext.gather_columns(x, idx)
    stream.synchronize()
    assert torch.equal(out, x[:, idx])


# ---- partial AdamW ------------------------------------------------------------------------------

HYPER = [
    {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "maximize": False},
    {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "maximize": False},
    {"lr": 3e-3, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.01, "maximize": True},
    # beta1 < 0.5 takes the other branch of torch's lerp.
    {"lr": 1e-2, "beta1": 0.3, "beta2": 0.9, "eps": 1e-8, "weight_decay": 0.05, "maximize": False},
]


def _adamw_reference(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, hp: dict) -> Tensor:
    """torch.optim.AdamW's single-tensor update in float32 (same ops as torch); returns new p."""
    p, g = p.float(), g.float()
    if hp["maximize"]:
        g = -g
    p.mul_(1 - hp["lr"] * hp["weight_decay"])
    m.lerp_(g, 1 - hp["beta1"])
    v.mul_(hp["beta2"]).addcmul_(g, g, value=1 - hp["beta2"])
    denom = (v.sqrt() / math.sqrt(1 - hp["beta2"] ** step)).add_(hp["eps"])
    return p.addcdiv_(m, denom, value=-hp["lr"] / (1 - hp["beta1"] ** step))


def _synced_weight(weight: Tensor, before: Tensor, cols: Tensor, idx: Tensor) -> None:
    """weight[:, idx] == cols exactly, every other column bit-identical to `before`."""
    assert torch.equal(weight[:, idx], cols)
    others = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    others[idx] = False
    assert torch.equal(weight[:, others], before[:, others])


@pytest.mark.parametrize(
    "hp", HYPER, ids=lambda hp: f"wd{hp['weight_decay']}-b{hp['beta1']}-{hp['maximize']}"
)
@pytest.mark.parametrize(("m", "k", "r", "layout"), [(7, 33, 3, "contiguous"), (130, 257, 40, "transposed")])
def test_partial_adamw_matches_torch_adamw(device, m, k, r, layout, hp) -> None:
    gen = _gen(m + k + r)
    weight = _matrix(m, k, layout, torch.float32, device, gen)
    idx = _index(k, r, "unsorted", gen, device)
    param = torch.nn.Parameter(weight[:, idx].clone())
    opt = torch.optim.AdamW(
        [param], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], maximize=hp["maximize"], foreach=False,
    )  # fmt: skip
    cols = param.detach().clone()
    exp_avg = torch.zeros_like(cols)
    exp_avg_sq = torch.zeros_like(cols)
    for step in range(1, 6):
        grad = torch.randn(m, r, generator=gen).to(device)
        param.grad = grad.clone()
        opt.step()
        before = weight.clone()
        _ext.partial_adamw(cols, grad, exp_avg, exp_avg_sq, weight, idx, hyper=AdamWStep(step, **hp))
        state = opt.state[param]
        torch.testing.assert_close(cols, param.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        _synced_weight(weight, before, cols, idx)


@pytest.mark.parametrize("shape", [(17,), (3, 5, 7)], ids=str)
def test_partial_adamw_without_weight(device, shape) -> None:
    gen = _gen(sum(shape))
    hp = HYPER[1]
    param = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
    opt = torch.optim.AdamW(
        [param], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], foreach=False,
    )  # fmt: skip
    cols = param.detach().clone()
    exp_avg, exp_avg_sq = torch.zeros_like(cols), torch.zeros_like(cols)
    for step in range(1, 4):
        grad = torch.randn(shape, generator=gen).to(device)
        param.grad = grad.clone()
        opt.step()
        _ext.partial_adamw(cols, grad, exp_avg, exp_avg_sq, hyper=AdamWStep(step, **hp))
        torch.testing.assert_close(cols, param.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hp", HYPER[1:3], ids=["decay", "maximize"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "step2"])
def test_partial_adamw_half_precision(device, dtype, layout, hp) -> None:
    """16-bit cols: float32 math and moments, one rounding of the result per step."""
    m, k, r = 33, 70, 9
    gen = _gen(m * k + r)
    weight = _matrix(m, k, layout, dtype, device, gen)
    idx = _index(k, r, "unsorted", gen, device)
    cols = weight[:, idx].contiguous()
    ref_p = cols.clone()
    exp_avg, exp_avg_sq = torch.zeros(m, r, device=device), torch.zeros(m, r, device=device)
    ref_m, ref_v = exp_avg.clone(), exp_avg_sq.clone()
    for step in range(1, 6):
        grad = torch.randn(m, r, generator=gen).to(dtype=dtype, device=device)
        ref_p = _adamw_reference(ref_p, grad, ref_m, ref_v, step, hp).to(dtype)
        before = weight.clone()
        _ext.partial_adamw(cols, grad, exp_avg, exp_avg_sq, weight, idx, hyper=AdamWStep(step, **hp))
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(cols.float(), ref_p.float(), rtol=ulp, atol=ulp * 1e-3)
        torch.testing.assert_close(exp_avg, ref_m, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(exp_avg_sq, ref_v, rtol=1e-6, atol=1e-9)
        _synced_weight(weight, before, cols, idx)
        ref_p = cols.clone()  # compare each step from the same start


@pytest.mark.parametrize("decay", [0.7, 1.5, 3e-5], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_rounding_matches_torch(device, dtype, decay) -> None:
    """With zero gradient and moments the update is p * (1 - lr*wd), rounded once: every 16-bit
    pattern (subnormals, overflow to inf, ties) must round exactly like torch's .to(dtype)."""
    cols = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
    cols = cols.reshape(256, 256)
    weight_decay = 1.0 - decay
    expected = (cols.float() * (1 - 1.0 * weight_decay)).to(dtype)  # the scalar as the kernel computes it
    zeros = torch.zeros(cols.shape, device=device)
    hp = {"lr": 1.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": weight_decay}
    _ext.partial_adamw(cols, torch.zeros_like(cols), zeros, zeros.clone(), hyper=AdamWStep(1, **hp))
    nan = expected.isnan()
    assert torch.equal(cols.isnan(), nan)
    assert torch.equal(cols.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


@pytest.mark.gpu
@NO_GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel_is_bitwise_twin_of_cpu_kernel(dtype) -> None:
    """No FMA contraction on either side: the CUDA kernel must reproduce the CPU twin exactly."""
    if not _ext.cuda_compiled():
        pytest.skip("slimtune._C built without CUDA")
    m, k, r = 300, 520, 37
    results = {}
    for device in ("cpu", "cuda"):
        g = _gen(99)
        weight = _matrix(m, k, "transposed", dtype, torch.device(device), g)
        idx = _index(k, r, "unsorted", g, torch.device(device))
        cols = weight[:, idx].contiguous()
        moments = torch.zeros(m, r, device=device), torch.zeros(m, r, device=device)
        for step in range(1, 4):
            grad = torch.randn(m, r, generator=g).to(dtype=dtype, device=device)
            _ext.partial_adamw(cols, grad, *moments, weight, idx, hyper=AdamWStep(step, **HYPER[2]))
        results[device] = [t.cpu() for t in (cols, *moments, weight)]
    for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
        assert torch.equal(cpu, cuda)


# ---- input validation ---------------------------------------------------------------------------


def _adamw_inputs(m: int = 4, k: int = 6, r: int = 3) -> dict:
    return {
        "cols": torch.randn(m, r),
        "grad": torch.randn(m, r),
        "exp_avg": torch.zeros(m, r),
        "exp_avg_sq": torch.zeros(m, r),
        "weight": torch.randn(m, k),
        "idx": torch.tensor([4, 0, 2]),
    }


HP = {"step": 1, "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}

BAD_GATHER = [
    ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
    ({"x": torch.ones(3, 4, dtype=torch.int32)}, TypeError, "x has dtype torch.int32"),
    ({"x": torch.ones(3, 4, 1)}, ValueError, "x must be 2-D"),
    ({"idx": torch.tensor([0, 1], dtype=torch.int32)}, TypeError, "idx has dtype torch.int32"),
    ({"idx": torch.tensor([[0, 1]])}, ValueError, "idx must be 1-D"),
    ({"idx": torch.arange(4)[::2]}, ValueError, "idx must be contiguous"),
    ({"idx": torch.tensor([0, 4])}, ValueError, r"idx\[1\] = 4 is out of range for 4 columns"),
    ({"idx": torch.tensor([-1])}, ValueError, "out of range"),
    ({"out": torch.empty(3, 3)}, ValueError, r"out has shape \(3, 3\); expected \(3, 2\)"),
    ({"out": torch.empty(3, 2, dtype=torch.float16)}, TypeError, "out has dtype torch.float16"),
    ({"out": torch.empty(2, 3).t()}, ValueError, "out must be contiguous"),
    ({"idx": torch.tensor([0, 1], device="meta")}, ValueError, "idx is on meta but x is on cpu"),
    ({"x": torch.ones(3, 4, device="meta"), "idx": torch.tensor([0, 1], device="meta")}, ValueError,
     "x is on meta; slimtune._C kernels take CPU or CUDA tensors"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "error", "match"), BAD_GATHER)
def test_gather_rejects_bad_inputs(change: dict, error: type, match: str) -> None:
    args = {"x": torch.ones(3, 4), "idx": torch.tensor([0, 1]), "out": None} | change
    with pytest.raises(error, match=match):
        _ext.gather_columns(**args)


BAD_SCATTER = [
    ({"cols": torch.ones(3, 2, dtype=torch.bfloat16)}, TypeError, "cols has dtype torch.bfloat16"),
    ({"cols": torch.ones(2, 2)}, ValueError, r"cols has shape \(2, 2\); expected \(3, 2\)"),
    ({"idx": torch.tensor([1, 1])}, ValueError, "idx contains column 1 twice"),
    (
        {"idx": torch.arange(5), "cols": torch.ones(3, 5)},
        ValueError,
        "selects 5 columns but weight has only 4",
    ),
    ({"weight": torch.ones(4)}, ValueError, "weight must be 2-D"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_SCATTER)
def test_scatter_rejects_bad_inputs(change: dict, error: type, match: str) -> None:
    args = {"weight": torch.ones(3, 4), "idx": torch.tensor([0, 1]), "cols": torch.ones(3, 2)} | change
    with pytest.raises(error, match=match):
        _ext.scatter_columns(**args)


BAD_ADAMW = [
    ({"exp_avg": torch.zeros(4, 3, dtype=torch.float16)}, {}, TypeError, "exp_avg has dtype torch.float16"),
    ({"grad": torch.randn(4, 3, dtype=torch.float64)}, {}, TypeError, "grad has dtype torch.float64"),
    ({"grad": torch.randn(3, 4)}, {}, ValueError, r"grad has shape \(3, 4\); expected \(4, 3\)"),
    ({"cols": torch.randn(3, 4).t()}, {}, ValueError, "cols must be contiguous"),
    ({"exp_avg_sq": torch.zeros(3, 4).t()}, {}, ValueError, "exp_avg_sq must be contiguous"),
    ({}, {"step": 0}, ValueError, "step must be >= 1"),
    ({}, {"step": 1.5}, TypeError, "integer"),
    ({"idx": None}, {}, ValueError, "weight and idx must be given together"),
    ({"weight": torch.randn(5, 6)}, {}, ValueError, "weight has 5 rows but cols has 4"),
    ({"weight": torch.randn(4, 6, dtype=torch.bfloat16)}, {}, TypeError, "weight has dtype torch.bfloat16"),
    ({"idx": torch.tensor([0, 1])}, {}, ValueError, r"idx has shape \(2,\); expected \(3,\)"),
    ({"idx": torch.tensor([0, 5, 0])}, {}, ValueError, "idx contains column 0 twice"),
    ({"idx": torch.tensor([0, 6, 1])}, {}, ValueError, "out of range for 6 columns"),
    ({"weight": torch.randn(4, 2)}, {}, ValueError, "cols has 3 columns but weight has only 2"),
    ({"cols": torch.randn(12), "grad": torch.randn(12), "exp_avg": torch.zeros(12),
      "exp_avg_sq": torch.zeros(12)}, {}, ValueError, "cols must be 2-D"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "hp_change", "error", "match"), BAD_ADAMW)
def test_partial_adamw_rejects_bad_inputs(change: dict, hp_change: dict, error: type, match: str) -> None:
    args = _adamw_inputs() | change
    with pytest.raises(error, match=match):
        _ext.partial_adamw(**args, hyper=AdamWStep(**(HP | hp_change)))


def test_rejected_call_writes_nothing() -> None:
    """Validation happens before any write: a bad idx leaves every tensor untouched."""
    args = _adamw_inputs() | {"idx": torch.tensor([0, 6, 1])}
    before = {name: t.clone() for name, t in args.items()}
    with pytest.raises(ValueError):
        _ext.partial_adamw(**args, hyper=AdamWStep(**HP))
    for name, t in args.items():
        assert torch.equal(t, before[name]), name


def test_status_functions() -> None:
    assert _ext.available() is True
    assert _ext.load_error() is None
    assert isinstance(_ext.cuda_compiled(), bool)
