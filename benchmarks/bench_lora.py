"""Microbenchmarks of the fused LoRA kernels and layers, next to the dense floor, unfused LoRA and PEFT.

Same harness and conventions as bench_kernels.py (its `measure` fixture, cold input sets, pedantic
timing, a summary of speedups over each group's reference). Every op runs on each backend that can
run here next to its `torch` reference (cuBLAS/MKL products with the low-rank term accumulated as an
extra GEMM); the group's reference is the dense frozen product, the floor LoRA has to approach. Layer
groups time forward + backward (x needs its gradient, adapters train) of one projection, q/k/v
sharing one input, and a Llama gated MLP: dense frozen (reference), slimtune fused, slimtune unfused
(per-layer path), PEFT LoRA with its defaults (float32 adapters) and with adapters in the model dtype.
Shapes: TinyLlama's projections, 4096 and 16384 tokens, r=16, bf16 on CUDA; small fp32 ones on CPU.

    .venv/bin/pytest benchmarks/bench_lora.py                                   # CPU, about a minute
    .venv/bin/pytest benchmarks/bench_lora.py --benchmark-json benchmarks/results/lora-H100.json
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import bench_kernels
import peft
import pytest
import torch
from bench_kernels import DEVICE, Shape, _backends, _force, _randn
from slimtune import LoRAConfig, apply, ops, trainable_parameters
from slimtune.layers.lora import AdapterLinear, FusedGatedMLP
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

measure = bench_kernels.measure  # the shared timing fixture
R = 16
if DEVICE.type == "cuda":  # TinyLlama-1.1B: (name, K in, M out); MLP (K, I); attention (K, q out, k/v out)
    _LAYERS = (("q_o", 2048, 2048), ("k_v", 2048, 256), ("up", 2048, 5632), ("down", 5632, 2048))
    _TOKENS, _DTYPE, _MLP, _ATTN = (4096, 16384), torch.bfloat16, (2048, 5632), (2048, 2048, 256)
else:
    _LAYERS = (("up", 256, 704), ("down", 704, 256))
    _TOKENS, _DTYPE, _MLP, _ATTN = (512,), torch.float32, (256, 704), (256, 256, 64)

SHAPES = [Shape(name, n, k, m, R, _DTYPE) for name, k, m in _LAYERS for n in _TOKENS]


def _gemm_flops(shape: Shape) -> int:
    return 2 * shape.n * shape.k * shape.m


# ---- ops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["dense", *_backends("lora_linear")])
@pytest.mark.parametrize("shape", SHAPES, ids=Shape.label)
def test_lora_linear(measure: Callable[..., None], shape: Shape, backend: str) -> None:
    """y = x W^T + u (sB)^T: the low-rank term inside the base GEMM (triton) or as a second pass (torch)."""
    n, k, m, r = shape.n, shape.k, shape.m, shape.r
    weight, b = _randn(m, k, dtype=shape.dtype), _randn(m, r, dtype=shape.dtype)

    def inputs() -> tuple[Tensor, Tensor]:
        return _randn(n, k, dtype=shape.dtype), _randn(n, r, dtype=shape.dtype)

    if backend == "dense":
        step, context = (lambda x, u: torch.nn.functional.linear(x, weight)), torch.no_grad()
    else:
        step, context = (lambda x, u: ops.lora_linear(x, weight, None, u, b)), _force("lora_linear", backend)
    with context:
        measure(
            f"lora_linear {shape.label()}",
            backend,
            inputs,
            step,
            flops=_gemm_flops(shape),
            reference=backend == "dense",
        )


@pytest.mark.parametrize("backend", ["dense", *_backends("lora_input_grad")])
@pytest.mark.parametrize("shape", SHAPES, ids=Shape.label)
def test_lora_input_grad(measure: Callable[..., None], shape: Shape, backend: str) -> None:
    """dx = dy W + g A written once (triton) or with a second accumulating GEMM (torch)."""
    n, k, m, r = shape.n, shape.k, shape.m, shape.r
    weight, a = _randn(m, k, dtype=shape.dtype), _randn(r, k, dtype=shape.dtype)

    def inputs() -> tuple[Tensor, Tensor]:
        return _randn(n, m, dtype=shape.dtype), _randn(n, r, dtype=shape.dtype)

    if backend == "dense":
        step, context = (lambda dy, g: dy @ weight), torch.no_grad()
    else:
        step = lambda dy, g: ops.lora_input_grad(g, a, [dy], [weight])  # noqa: E731
        context = _force("lora_input_grad", backend)
    with context:
        measure(
            f"lora_input_grad {shape.label()}",
            backend,
            inputs,
            step,
            flops=_gemm_flops(shape),
            reference=backend == "dense",
        )


GLU_SHAPES = [Shape("mlp", n, 0, _MLP[1], R, _DTYPE) for n in _TOKENS]


@pytest.mark.parametrize("backend", ["dense", *_backends("glu_down")])
@pytest.mark.parametrize("shape", GLU_SHAPES, ids=Shape.label)
def test_glu_down(measure: Callable[..., None], shape: Shape, backend: str) -> None:
    """h = silu(gate) * up and u = h A^T in one pass (triton), against silu(gate) * up alone (dense)."""
    n, i, r, size = shape.n, shape.m, shape.r, shape.itemsize
    a = _randn(r, i, dtype=shape.dtype)

    def inputs() -> tuple[Tensor, Tensor]:
        return _randn(n, i, dtype=shape.dtype), _randn(n, i, dtype=shape.dtype)

    if backend == "dense":
        step, context = (lambda g, v: torch.nn.functional.silu(g) * v), torch.no_grad()
    else:
        step, context = (lambda g, v: ops.glu_down(g, v, a, "silu")), _force("glu_down", backend)
    with context:
        measure(
            f"glu_down {shape.label()}",
            backend,
            inputs,
            step,
            moved_bytes=3 * n * i * size,
            reference=backend == "dense",
        )


@pytest.mark.parametrize("backend", _backends("glu_backward"))
@pytest.mark.parametrize("shape", GLU_SHAPES, ids=Shape.label)
def test_glu_backward(measure: Callable[..., None], shape: Shape, backend: str) -> None:
    """dgate, dup and the recomputed h from dh, gate, up: 3 reads and 3 writes per element."""
    n, i = shape.n, shape.m

    def inputs() -> tuple[Tensor, ...]:
        return tuple(_randn(n, i, dtype=shape.dtype) for _ in range(5))

    with _force("glu_backward", backend):
        measure(
            f"glu_backward {shape.label()}",
            backend,
            inputs,
            lambda dh, g, v, dg, dv: ops.glu_backward(dh, g, v, "silu", dg, dv),
            moved_bytes=6 * n * i * shape.itemsize,
            reference=backend == "torch",
        )


# ---- layers, forward + backward --------------------------------------------------------------------


class _Block(nn.Module):
    """Projections as Hugging Face calls them: one linear, q/k/v on one input, or a Llama MLP."""

    def __init__(self, kind: str, k: int, outs: tuple[int, ...]) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.mlp = LlamaMLP(LlamaConfig(hidden_size=k, intermediate_size=outs[0], hidden_act="silu"))
        else:
            for name, m in zip(("q_proj", "k_proj", "v_proj"), outs, strict=False):
                setattr(self, name, nn.Linear(k, m, bias=False))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.kind == "mlp":
            return self.mlp(x)
        return tuple(getattr(self, n)(x) for n in ("q_proj", "k_proj", "v_proj") if hasattr(self, n))


def _prepare(block: _Block, path: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """The block on `path`, frozen but for its adapters; returns (module, adapter parameters)."""
    block.requires_grad_(False)
    if path == "dense":
        return block, []
    targets = r".*_proj"  # every linear of the block (a regex, for PEFT and slimtune alike)
    if path.startswith("peft"):
        config = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets)
        model = peft.get_peft_model(block, config, autocast_adapter_dtype=path == "peft")
        return model, [p for p in model.parameters() if p.requires_grad]
    apply(block, LoRAConfig(r=R, alpha=2 * R, target_modules=targets))
    if path == "unfused":  # the per-layer path: no sibling group, no fused MLP
        if isinstance(getattr(block, "mlp", None), FusedGatedMLP):
            block.mlp = block.mlp.restore()
        for module in block.modules():
            if isinstance(module, AdapterLinear):
                module.shared = None
    return block, trainable_parameters(block)


LAYER_PATHS = ("dense", "fused", "unfused", "peft", "peft-bf16")
BLOCKS = {
    "one": (_LAYERS[-2][1], (_LAYERS[-2][2],)),  # the up_proj shape
    "qkv": (_ATTN[0], _ATTN[1:] + _ATTN[2:]),
    "mlp": (_MLP[0], (_MLP[1],)),
}


@pytest.mark.parametrize("path", LAYER_PATHS)
@pytest.mark.parametrize("tokens", _TOKENS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_fwd_bwd(measure: Callable[..., None], kind: str, tokens: int, path: str) -> None:
    """Forward + backward with x needing its gradient; `dense` (all frozen) is the floor and reference."""
    k, outs = BLOCKS[kind]
    torch.manual_seed(0)
    template = _Block(kind, k, outs).to(device=DEVICE, dtype=_DTYPE)
    module, params = _prepare(copy.deepcopy(template), path)
    widths = [k] if kind == "mlp" else list(outs)

    def inputs() -> tuple[Tensor, ...]:
        x = _randn(tokens, k, dtype=_DTYPE).requires_grad_()
        return (x, *[_randn(tokens, w, dtype=_DTYPE) for w in widths])

    def step(x: Tensor, *dys: Tensor) -> object:
        ys = module(x)
        ys = ys if isinstance(ys, tuple) else (ys,)
        return torch.autograd.grad(ys, (x, *params), dys)

    gemm = 2 * tokens * k * (sum(outs) if kind != "mlp" else 3 * outs[0])
    measure(
        f"{kind} fwd+bwd N{tokens} r{R} {_DTYPE}",
        path,
        inputs,
        step,
        flops=2 * gemm,
        reference=path == "dense",
    )
