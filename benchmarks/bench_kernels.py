"""Microbenchmarks of slimtune's kernels and of the PaCA layer, each next to its PyTorch reference.

Every op of `slimtune.ops.OPS` runs on each backend that can run on this machine's device (CUDA when
present, else CPU), forced with `ops.use_backend`, next to the `torch` reference. The PaCA layer's
forward + backward runs next to a dense `nn.Linear` with the input gradient only (the floor, the
group's reference), a dense one with input and weight gradients, and the naive PaCA autograd
function of the H200 anchors (benchmarks/results/anchors-h200-2026-11-26.md). Shapes: TinyLlama's
projections, 4096 and 16384 tokens, r=64, bf16 on CUDA; small fp32 shapes on CPU. Benchmarks are
grouped by op and shape; `extra_info` holds
the bytes moved and FLOPs of one call and the GB/s and TFLOP/s achieved at the median, and the
summary at the end prints those rates and each backend's speedup over the group's reference.

Run from the repository root:

    # CPU: small shapes, about a minute on 2 cores (Triton is skipped: its interpreter is no benchmark)
    .venv/bin/pytest benchmarks/bench_kernels.py
    # GPU: TinyLlama shapes, a few minutes; name the card in the JSON file's name
    .venv/bin/pytest benchmarks/bench_kernels.py --benchmark-json benchmarks/results/kernels-H100.json
    # one op or one shape: -k gather_columns, -k "gate_up and N4096"; shorter runs: --benchmark-max-time 0.2
    # on a busy shared CPU prefix OMP_NUM_THREADS=1, or torch's thread pool waits out scheduler slices

Timing (pedantic mode, host clock): after a warm-up (Triton compiles, the allocator fills) and a
calibration of the calls per round, each round makes `iterations` back-to-back calls and then
synchronizes the device, so a time is per call with launch and dispatch included, and a round starts
on an idle device. Each call takes the next of several random input sets totalling at least 256 MiB
(64 MiB on CPU), so inputs come from memory, not from a warm cache, as in a training step.
`--benchmark-max-time` (seconds per benchmark) and `--benchmark-min-rounds` are honoured. Bytes
moved count the useful traffic only (a gather reads N x r elements, however many lines it touches).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from slimtune import ops
from slimtune.layers import PaCALinear
from torch import Tensor, nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Rotate input sets up to this total: several times the last-level cache (50-60 MB of L2 on an
# H100/H200, tens of MB of L3 on a CPU).
COLD_BYTES = (256 if DEVICE.type == "cuda" else 64) << 20
MAX_SETS = 64
WARMUP_CALLS = 3
ROUND_SECONDS = 2e-3  # calls per round: enough to amortise the host clock and the synchronize
CALIBRATE_SECONDS = 0.02


@dataclass(frozen=True)
class Shape:
    """One linear layer: N tokens, K inputs, M outputs, r trained columns."""

    name: str
    n: int
    k: int
    m: int
    r: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def label(self, tokens: bool = True) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.name}-{f'N{self.n}-' if tokens else ''}K{self.k}-M{self.m}-r{self.r}-{dtype}"


if DEVICE.type == "cuda":  # TinyLlama-1.1B: (name, K in, M out)
    _LAYERS = (("q_o", 2048, 2048), ("k_v", 2048, 256), ("gate_up", 2048, 5632), ("down", 5632, 2048))
    _TOKENS, _R, _DTYPE = (4096, 16384), 64, torch.bfloat16
else:
    _LAYERS = (("up", 256, 704), ("down", 704, 256))
    _TOKENS, _R, _DTYPE = (512,), 16, torch.float32

TOKEN_SHAPES = [Shape(name, n, k, m, _R, _DTYPE) for name, k, m in _LAYERS for n in _TOKENS]
WEIGHT_SHAPES = [Shape(name, 0, k, m, _R, _DTYPE) for name, k, m in _LAYERS]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _index(k: int, r: int) -> Tensor:
    """r distinct sorted random columns out of k."""
    return torch.randperm(k, device=DEVICE)[:r].sort().values


def _randn(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


class _Timed:
    """The timed callable: runs `step` on the next input set; every `every`-th call waits for the device."""

    def __init__(self, step: Callable[..., object], sets: list[tuple[Any, ...]]) -> None:
        self.step, self.sets, self.every, self.calls = step, sets, 1, 0

    def __call__(self) -> None:
        self.step(*self.sets[self.calls % len(self.sets)])
        self.calls += 1
        if self.calls % self.every == 0:
            _sync()


def _seconds_per_call(timed: _Timed) -> float:
    """Warm up, then estimate the time of one call."""
    timed.every = 1 << 62  # synchronized explicitly here
    for _ in range(WARMUP_CALLS):
        timed()
    _sync()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            timed()
        _sync()
        elapsed = time.perf_counter() - start
        if elapsed >= CALIBRATE_SECONDS:
            return elapsed / calls
        calls *= 2


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def measure(benchmark: Any, request: pytest.FixtureRequest) -> Callable[..., None]:
    """`measure(group, label, make_inputs, step, ...)`: time `step(*make_inputs())` and record its rates."""

    def run(
        group: str,
        label: str,
        make_inputs: Callable[[], tuple[Any, ...]],
        step: Callable[..., object],
        *,
        moved_bytes: int = 0,
        flops: int = 0,
        reference: bool = False,
        info: dict[str, object] | None = None,
    ) -> None:
        first = make_inputs()
        footprint = sum(t.nbytes for t in first if isinstance(t, Tensor))
        sets = [first] + [make_inputs() for _ in range(min(MAX_SETS, math.ceil(COLD_BYTES / footprint)) - 1)]
        timed = _Timed(step, sets)
        seconds = _seconds_per_call(timed)
        iterations = max(1, math.ceil(ROUND_SECONDS / seconds))
        max_time = float(request.config.getoption("benchmark_max_time"))
        min_rounds = int(request.config.getoption("benchmark_min_rounds"))
        rounds = max(min_rounds, int(max_time / (iterations * seconds)))
        benchmark.group = group
        record = {"label": label, "reference": reference, "bytes": moved_bytes, "flops": flops}
        benchmark.extra_info.update(record, input_sets=len(sets), device=str(DEVICE), **(info or {}))
        timed.every, timed.calls = iterations, 0
        benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1)
        if benchmark.stats:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            if moved_bytes:
                benchmark.extra_info["GB/s"] = round(moved_bytes / median / 1e9, 2)
            if flops:
                benchmark.extra_info["TFLOP/s"] = round(flops / median / 1e12, 3)

    return run


def _force(op: str, backend: str) -> AbstractContextManager[None]:
    """`ops.use_backend(op, backend)`, or skip the test with the reason that backend cannot run here."""
    reason = ops.backend_unavailable(backend, DEVICE)
    if reason is None and backend == "triton" and DEVICE.type != "cuda":
        reason = "the Triton interpreter (TRITON_INTERPRET=1) is not timed"
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return ops.use_backend(op, backend)


def _backends(op: str) -> list[str]:
    """The op's reference first, then its native backends."""
    return list(ops.OPS[op].impls)


# ---- ops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends("gather_columns"))
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=Shape.label)
def test_gather_columns(measure: Callable[..., None], shape: Shape, backend: str) -> None:
    """x[:, idx] of the (N, K) input: what the PaCA forward saves."""
    idx = _index(shape.k, shape.r)
    with _force("gather_columns", backend):
        measure(
            f"gather_columns {shape.label()}",
            backend,
            lambda: (_randn(shape.n, shape.k, dtype=shape.dtype),),
            lambda x: ops.gather_columns(x, idx),
            moved_bytes=2 * shape.n * shape.r * shape.itemsize,
            reference=backend == "torch",
        )


@pytest.mark.parametrize("backend", _backends("scatter_columns"))
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: s.label(tokens=False))
def test_scatter_columns(measure: Callable[..., None], shape: Shape, backend: str) -> None:
    """weight[:, idx] = columns, in place: the sync before a forward."""
    idx = _index(shape.k, shape.r)

    def inputs() -> tuple[Tensor, Tensor]:
        return _randn(shape.m, shape.k, dtype=shape.dtype), _randn(shape.m, shape.r, dtype=shape.dtype)

    with _force("scatter_columns", backend):
        measure(
            f"scatter_columns {shape.label(tokens=False)}",
            backend,
            inputs,
            lambda weight, cols: ops.scatter_columns(weight, idx, cols),
            moved_bytes=2 * shape.m * shape.r * shape.itemsize,
            reference=backend == "torch",
        )


@pytest.mark.parametrize("backend", _backends("column_grad"))
@pytest.mark.parametrize("indexed", [False, True], ids=["compact", "indexed"])
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=Shape.label)
def test_column_grad(measure: Callable[..., None], shape: Shape, indexed: bool, backend: str) -> None:
    """dy^T @ x[:, idx], (M, r): on the compact (N, r) buffer the layer saves, or through the index."""
    idx = _index(shape.k, shape.r) if indexed else None
    width = shape.k if indexed else shape.r

    def inputs() -> tuple[Tensor, Tensor]:
        return _randn(shape.n, shape.m, dtype=shape.dtype), _randn(shape.n, width, dtype=shape.dtype)

    n, m, r, size = shape.n, shape.m, shape.r, shape.itemsize
    with _force("column_grad", backend):
        measure(
            f"column_grad {'indexed' if indexed else 'compact'} {shape.label()}",
            backend,
            inputs,
            lambda dy, x: ops.column_grad(dy, x, idx, shape.dtype),
            moved_bytes=(n * m + n * r + m * r) * size,
            flops=2 * n * m * r,
            reference=backend == "torch",
        )


@pytest.mark.parametrize("backend", _backends("partial_adamw"))
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: s.label(tokens=False))
def test_partial_adamw(measure: Callable[..., None], shape: Shape, backend: str) -> None:
    """One AdamW step on the (M, r) columns (float32 moments) that also writes them into the weight."""
    idx = _index(shape.k, shape.r)
    m, r = shape.m, shape.r

    def inputs() -> tuple[Tensor, ...]:
        cols, grad = _randn(m, r, dtype=shape.dtype), _randn(m, r, dtype=shape.dtype)
        exp_avg, exp_avg_sq = _randn(m, r, dtype=torch.float32), _randn(m, r, dtype=torch.float32).square()
        return cols, grad, exp_avg, exp_avg_sq, _randn(m, shape.k, dtype=shape.dtype)

    def step(cols: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, weight: Tensor) -> None:
        ops.partial_adamw(
            cols, grad, exp_avg, exp_avg_sq, weight, idx,
            hyper=ops.AdamWStep(step=10, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
        )  # fmt: skip

    # cols read + written, grad read, both float32 moments read + written, weight columns written
    with _force("partial_adamw", backend):
        measure(
            f"partial_adamw {shape.label(tokens=False)}",
            backend,
            inputs,
            step,
            moved_bytes=m * r * (4 * shape.itemsize + 16),
            reference=backend == "torch",
        )


# ---- one linear layer, forward + backward ----------------------------------------------------------


class _NaivePaCA(torch.autograd.Function):
    """The anchors' naive PaCA: y = x W^T saving x[:, idx]; dx = dy W, d(columns) = dy^T x[:, idx]."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, columns: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(x[:, idx], weight)  # `columns` is an input only to receive its gradient
        return x @ weight.t()

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, Tensor, None]:
        picked, weight = ctx.saved_tensors
        return dy @ weight, None, dy.t() @ picked, None


def _linear(shape: Shape, weight_grad: bool = False) -> nn.Linear:
    linear = nn.Linear(shape.k, shape.m, bias=False, device=DEVICE, dtype=shape.dtype)
    linear.weight.requires_grad_(weight_grad)
    return linear


def _dense_input_grad(shape: Shape) -> Callable[[Tensor, Tensor], object]:
    linear = _linear(shape)
    return lambda x, dy: torch.autograd.grad(linear(x), (x,), dy)


def _dense_weight_grad(shape: Shape) -> Callable[[Tensor, Tensor], object]:
    linear = _linear(shape, weight_grad=True)
    return lambda x, dy: torch.autograd.grad(linear(x), (x, linear.weight), dy)


def _naive_paca(shape: Shape) -> Callable[[Tensor, Tensor], object]:
    weight, idx = _linear(shape).weight, _index(shape.k, shape.r)
    columns = nn.Parameter(weight.detach()[:, idx].clone())
    return lambda x, dy: torch.autograd.grad(_NaivePaCA.apply(x, weight, columns, idx), (x, columns), dy)


def _paca(shape: Shape) -> Callable[[Tensor, Tensor], object]:
    layer = PaCALinear(_linear(shape), _index(shape.k, shape.r))
    return lambda x, dy: torch.autograd.grad(layer(x), (x, layer.paca_columns), dy)


LINEAR_PATHS = {
    "dense_input_grad": _dense_input_grad,
    "dense_weight_grad": _dense_weight_grad,
    "naive_paca": _naive_paca,
    "paca": _paca,
}


@pytest.mark.parametrize("path", LINEAR_PATHS)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=Shape.label)
def test_linear_fwd_bwd(measure: Callable[..., None], shape: Shape, path: str) -> None:
    """Forward + backward of one linear layer (x needs its gradient); PaCA with its default backends."""
    step = LINEAR_PATHS[path](shape)
    gemm = 2 * shape.n * shape.k * shape.m
    flops = {"dense_input_grad": 2 * gemm, "dense_weight_grad": 3 * gemm}.get(
        path, 2 * gemm + 2 * shape.n * shape.m * shape.r
    )

    def inputs() -> tuple[Tensor, Tensor]:
        x = _randn(shape.n, shape.k, dtype=shape.dtype).requires_grad_()
        return x, _randn(shape.n, shape.m, dtype=shape.dtype)

    measure(
        f"linear fwd+bwd {shape.label()}",
        path,
        inputs,
        step,
        flops=flops,
        reference=path == "dense_input_grad",
        info={"backends": {op: ops.OPS[op].choose(DEVICE)[0] for op in ops.OPS}} if path == "paca" else None,
    )
