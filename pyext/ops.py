"""Backend dispatch for slimtune's kernels.

CUDA tensors go to Triton or the CUDA extension, CPU tensors to the C++ extension, and anything
else (another device, a missing backend, an explicit override) to exact PyTorch code. Every op
has a PyTorch reference with the same semantics, which is also what the tests compare against.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from . import _ext

BACKENDS = ("triton", "cuda", "cpp", "blas", "torch")


@cache
def _triton_kernels():
    """The Triton kernel module, or the reason it cannot be used."""
    try:
        return importlib.import_module(".triton_kernels", __package__), None
    except Exception as err:  # triton missing or broken: fall back, and say why in info()
        return None, f"slimtune.triton_kernels failed to import: {type(err).__name__}: {err}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    if backend in ("torch", "blas"):  # plain torch code: cuBLAS on CUDA, MKL/OpenBLAS on CPU
        return None
    if backend == "triton":
        module, error = _triton_kernels()
        if module is None:
            return error
        if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
            return None
        return "Triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)"
    if not _ext.available():
        return f"slimtune._C unavailable ({_ext.load_error()})"
    if backend == "cpp":
        return None if device.type == "cpu" else "the C++ kernels take CPU tensors"
    if backend == "cuda":
        if not _ext.cuda_compiled():
            return "slimtune._C was built without CUDA (no CUDA compiler, or SLIMTUNE_WITH_CUDA=0)"
        return None if device.type == "cuda" else "the CUDA kernels take CUDA tensors"
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


@dataclass
class Op:
    """One kernel: its implementations and the order in which they are preferred per device."""

    name: str
    impls: dict[str, Callable]
    prefer_cuda: tuple[str, ...]
    prefer_cpu: tuple[str, ...]
    note: str = ""
    validate: Callable[..., None] | None = None

    def choose(self, device: torch.device) -> tuple[str, str]:
        """(backend, reason) for tensors on `device`, cached: ops run per layer per step."""
        key = (self.name, device.type)
        if key not in _choices:
            _choices[key] = self._choose(device)
        return _choices[key]

    def _choose(self, device: torch.device) -> tuple[str, str]:
        forced = (
            _forced.get(self.name)
            or os.environ.get(f"SLIMTUNE_BACKEND_{self.name.upper()}")
            or os.environ.get("SLIMTUNE_BACKEND")
        )
        if forced:
            if forced not in self.impls:
                raise ValueError(f"op {self.name} has no {forced!r} backend; it has {sorted(self.impls)}")
            problem = backend_unavailable(forced, device)
            if problem:
                raise RuntimeError(f"backend {forced!r} was forced for {self.name} but cannot run: {problem}")
            return forced, "forced"
        order = self.prefer_cuda if device.type == "cuda" else self.prefer_cpu if device.type == "cpu" else ()
        skipped = []
        for backend in order:
            problem = backend_unavailable(backend, device)
            if problem is None:
                return backend, "preferred" if not skipped else "; ".join(skipped)
            skipped.append(f"{backend}: {problem}")
        if skipped:
            return "torch", "; ".join(skipped)
        return "torch", self.note or f"no native kernel for {device.type} tensors"

    def run(self, *args, **kwargs):
        """The chosen backend on already validated input (what slimtune's custom ops call)."""
        backend, _ = self.choose(args[0].device)
        return self.impls[backend](*args, **kwargs)

    def __call__(self, *args, **kwargs):
        """Validate (indices by `check_index`, the one rule for every backend), then run."""
        if self.validate is not None:
            self.validate(*args, **kwargs)
        return self.run(*args, **kwargs)


def check_index(index: object, size: int, what: str, distinct: bool = False) -> None:
    """The one rule for an index into `size` rows or columns, on every backend and device.

    A 1-D int64 tensor with values in [0, size) (and no value twice where it is written through).
    Checked where an index enters slimtune, so kernels can assume it: on CUDA this reads the
    index back once.
    """
    if not isinstance(index, Tensor):
        raise TypeError(f"{what}: the index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64 or index.dim() != 1:
        raise TypeError(
            f"{what}: the index must be a 1-D int64 tensor, got {index.dtype} of shape {tuple(index.shape)}"
        )
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(f"{what}: index value {bad} is out of range [0, {size}); indices are not wrapped")
    if distinct and index.unique().numel() != index.numel():
        raise ValueError(f"{what}: the index holds a value twice; written entries must be distinct")


_forced: dict[str, str] = {}
_choices: dict[tuple[str, str], tuple[str, str]] = {}
_meta_models: list[str] = ["cuda"]  # the device whose program a step on the meta device stands for


@contextlib.contextmanager
def meta_models(device_type: str) -> Iterator[None]:
    """Inside the block a step on the meta device takes the paths `device_type` ("cuda" or "cpu")
    would: the accounting of a CPU run compares with what the CPU allocates, not with a card."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"the meta device models 'cuda' or 'cpu', not {device_type!r}")
    _meta_models.append(device_type)
    try:
        yield
    finally:
        _meta_models.pop()


def modelled_device() -> str:
    """What a step on the meta device stands for: "cuda" (a card; the default) or "cpu"."""
    return _meta_models[-1]


def runs_kernel(op: Op, device: torch.device) -> bool:
    """Whether `op` runs as one native kernel (Triton or CUDA) for tensors on `device`; on the meta
    device, whether it would on the device the meta device stands for (`meta_models`)."""
    if device.type == "meta":
        return modelled_device() == "cuda" and op.prefer_cuda[:1] in (("triton",), ("cuda",))
    return op.choose(device)[0] in ("triton", "cuda")


@contextlib.contextmanager
def use_backend(op_name: str, backend: str) -> Iterator[None]:
    """Force one op onto one backend inside the block (tests and benchmarks compare backends so)."""
    if op_name not in OPS:
        raise ValueError(f"unknown op {op_name!r}; ops are {sorted(OPS)}")
    previous = _forced.get(op_name)
    _forced[op_name] = backend
    _choices.clear()
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(op_name, None)
        else:
            _forced[op_name] = previous
        _choices.clear()


# ---- PyTorch references -------------------------------------------------------------------------


def gather_columns_ref(x: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """out[n, j] = x[n, idx[j]]."""
    result = x.index_select(1, idx)
    if out is None:
        return result
    out.copy_(result)
    return out


def scatter_columns_ref(weight: Tensor, idx: Tensor, cols: Tensor) -> None:
    """weight[:, idx[j]] = cols[:, j], in place."""
    with torch.no_grad():
        weight.index_copy_(1, idx, cols)


def column_grad_ref(
    dy: Tensor, x: Tensor, idx: Tensor | None = None, out_dtype: torch.dtype | None = None
) -> Tensor:
    """dy^T @ x[:, idx]: the gradient of the trained columns (BLAS accumulates in float32)."""
    cols = x if idx is None else x.index_select(1, idx)
    return (dy.t() @ cols).to(out_dtype or x.dtype)


@dataclass(frozen=True)
class AdamWStep:
    """One AdamW update's hyperparameters, as torch.optim.AdamW means them; `step` counts updates
    including this one. The one spelling for the kernel wrapper, the reference and the custom op."""

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False


def partial_adamw_ref(
    cols: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weight: Tensor | None = None,
    idx: Tensor | None = None,
    *,
    hyper: AdamWStep,
) -> None:
    """torch.optim.AdamW's update of `cols` in float32, then the new columns written into `weight`."""
    h = hyper
    with torch.no_grad():
        g = grad.float()
        if h.maximize:
            g = -g
        p = cols.float()
        p.mul_(1 - h.lr * h.weight_decay)
        exp_avg.lerp_(g, 1 - h.beta1)
        exp_avg_sq.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
        bias_correction1 = 1 - h.beta1**h.step
        bias_correction2_sqrt = (1 - h.beta2**h.step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(h.eps)
        p.addcdiv_(exp_avg, denom, value=-h.lr / bias_correction1)
        cols.copy_(p)
        if weight is not None:
            weight.index_copy_(1, idx, cols)


def _triton(name: str) -> Callable:
    def call(*args, **kwargs):
        module, error = _triton_kernels()
        if module is None:
            raise RuntimeError(error)
        return getattr(module, name)(*args, **kwargs)

    call.__name__ = f"triton_{name}"
    return call


def _extension(name: str) -> Callable:
    def call(*args, **kwargs):
        return getattr(_ext, name)(*args, **kwargs)

    call.__name__ = f"ext_{name}"
    return call


def _op(
    name: str,
    reference: Callable,
    prefer_cuda: tuple[str, ...],
    prefer_cpu: tuple[str, ...],
    selectable: tuple[str, ...] = (),
    note: str = "",
    validate: Callable[..., None] | None = None,
    blas: Callable | None = None,
) -> Op:
    """An op with its reference and its native backends (`selectable` ones run only when forced);
    `blas` is a torch implementation ordered for the vendor BLAS (backend "blas")."""
    impls: dict[str, Callable] = {"torch": reference}
    for backend in (*prefer_cuda, *prefer_cpu, *selectable):
        if backend == "blas":
            impls[backend] = blas
        else:
            impls[backend] = _triton(name) if backend == "triton" else _extension(name)
    return Op(name, impls, prefer_cuda, prefer_cpu, note, validate)


def _gather_index(x: Tensor, idx: Tensor, out: Tensor | None = None) -> None:
    check_index(idx, x.shape[-1], "gather_columns")


def _scatter_index(weight: Tensor, idx: Tensor, cols: Tensor) -> None:
    check_index(idx, weight.shape[-1], "scatter_columns", distinct=True)


def _column_grad_index(dy: Tensor, x: Tensor, idx: Tensor | None = None, out_dtype=None) -> None:
    if idx is not None:
        check_index(idx, x.shape[-1], "column_grad")


def _adamw_index(cols, grad, exp_avg, exp_avg_sq, weight=None, idx=None, **_) -> None:
    if weight is not None and idx is not None:
        check_index(idx, weight.shape[-1], "partial_adamw", distinct=True)


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        _op("gather_columns", gather_columns_ref, ("triton", "cuda"), ("cpp",), validate=_gather_index),
        _op("scatter_columns", scatter_columns_ref, ("triton", "cuda"), ("cpp",), validate=_scatter_index),
        _op(
            "column_grad",
            column_grad_ref,
            (),
            (),
            selectable=("triton",),
            note="the layer saves a compact (N, r) buffer, for which cuBLAS/MKL are the reference speed; "
            "the Triton kernel reads x through the index list and is selectable",
            validate=_column_grad_index,
        ),
        _op("partial_adamw", partial_adamw_ref, ("cuda",), ("cpp",), validate=_adamw_index),
    )
}

gather_columns = OPS["gather_columns"]
scatter_columns = OPS["scatter_columns"]
column_grad = OPS["column_grad"]
partial_adamw = OPS["partial_adamw"]


# ---- LoRA / Hydra (fused adapter paths; Triton kernels in triton_kernels/lora.py) -----------------


def lora_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, b: Tensor) -> Tensor:
    """x W^T + bias + u b^T: the base GEMM, then the low-rank term accumulated into it (beta=1)."""
    return torch.nn.functional.linear(x, weight, bias).addmm_(u, b.t())


def lora_input_grad_ref(g: Tensor, a: Tensor, dys: list[Tensor], weights: list[Tensor]) -> Tensor:
    """sum_i dy_i W_i + g a: each GEMM accumulates into one input gradient (beta=1)."""
    dx = dys[0] @ weights[0]
    for dy, weight in zip(dys[1:], weights[1:], strict=True):
        dx.addmm_(dy, weight)
    return dx.addmm_(g, a)


def lora_linear_blas(x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, b: Tensor) -> Tensor:
    """The low-rank term first (one thin GEMM writing the output), then the big base GEMM in cuBLAS
    accumulating into it (beta=1, read in the GEMM's epilogue): no extra pass over the output after
    the big product, unlike the reference's order."""
    out = torch.mm(u, b.t()) if bias is None else torch.addmm(bias, u, b.t())
    return out.addmm_(x, weight.t())


def lora_input_grad_blas(g: Tensor, a: Tensor, dys: list[Tensor], weights: list[Tensor]) -> Tensor:
    """g a first, then each dy_i W_i accumulated by cuBLAS (beta=1)."""
    dx = g @ a
    for dy, weight in zip(dys, weights, strict=True):
        dx.addmm_(dy, weight)
    return dx


def _silu(g: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(g)
    return g * s, s * (1 + g * (1 - s))


def _gelu_tanh(g: Tensor) -> tuple[Tensor, Tensor]:
    c = (2 / torch.pi) ** 0.5
    t = torch.tanh(c * (g + 0.044715 * g**3))
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)


def _gelu(g: Tensor) -> tuple[Tensor, Tensor]:
    cdf = 0.5 * (1 + torch.erf(g * 0.5**0.5))
    return g * cdf, cdf + g * torch.exp(-0.5 * g * g) / (2 * torch.pi) ** 0.5


GLU_ACTIVATIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "silu": _silu,
    "gelu_tanh": _gelu_tanh,
    "gelu": _gelu,
}
"""act(g) and act'(g) in float32, for the gated MLP's activations."""


def glu_down_ref(gate: Tensor, up: Tensor, a: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """h = act(gate) * up and the down adapter's u = h a^T."""
    act, _ = GLU_ACTIVATIONS[activation](gate.float())
    h = (act * up.float()).to(gate.dtype)
    return h, h @ a.t()


def glu_backward_ref(
    dh: Tensor, gate: Tensor, up: Tensor, activation: str, dgate: Tensor, dup: Tensor, need_h: bool = True
) -> Tensor | None:
    """Write dgate = dh * up * act'(gate), dup = dh * act(gate) (they may be gate and up themselves);
    return the recomputed h, or None unless need_h."""
    act, grad = GLU_ACTIVATIONS[activation](gate.float())
    dh, v = dh.float(), up.float()  # float32 inputs: the same tensors, written below
    h = (act * v).to(gate.dtype) if need_h else None
    dgate.copy_(dh * v * grad)
    dup.copy_(dh * act)
    return h


BLAS_FIRST = (
    "on CUDA the base GEMM runs in cuBLAS ('blas') until a GPU measurement shows the fused Triton GEMM "
    "('triton', selectable) faster; see docs/architecture.md"
)

OPS.update(
    {
        op.name: op
        for op in (
            _op(
                "lora_linear",
                lora_linear_ref,
                ("blas",),
                (),
                selectable=("triton",),
                note=BLAS_FIRST,
                blas=lora_linear_blas,
            ),
            _op(
                "lora_input_grad",
                lora_input_grad_ref,
                ("blas",),
                (),
                selectable=("triton",),
                note=BLAS_FIRST,
                blas=lora_input_grad_blas,
            ),
            _op("glu_down", glu_down_ref, ("triton",), ()),
            _op("glu_backward", glu_backward_ref, ("triton",), ()),
        )
    }
)

lora_linear = OPS["lora_linear"]
lora_input_grad = OPS["lora_input_grad"]
glu_down = OPS["glu_down"]
glu_backward = OPS["glu_backward"]


# ---- the lean frozen path (Triton kernels in triton_kernels/rms_norm.py, rope.py, lora.py, cross_entropy.py)

NORM_CHUNK = 4096  # rows per step of the reference norm backward: bounds its float32 temporaries


def rms_norm_forward_ref(
    x: Tensor, weight: Tensor, eps: float, offset: float, scale_in_fp32: bool
) -> tuple[Tensor, Tensor]:
    """(y, rstd) of the rows of x: rstd = rsqrt(mean(x^2) + eps) in float32; y = weight * xhat rounded
    to x's dtype (Llama) or ((offset + weight) * xhat).to(x's dtype) in float32 (Gemma)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    y = (xhat * (offset + weight.float())).to(x.dtype) if scale_in_fp32 else weight * xhat.to(x.dtype)
    return y, rstd.squeeze(-1)


def rms_norm_backward_ref(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float, scale_in_fp32: bool, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """(dx in x's dtype or None, d weight in float32), in chunks of rows (float32 temporaries of one
    chunk at a time), with the roundings of the forward's autograd."""
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    r2 = rstd.reshape(-1, 1)
    for start in range(0, x.shape[0], NORM_CHUNK):
        rows = slice(start, start + NORM_CHUNK)
        xhat = x[rows].float() * r2[rows]
        if scale_in_fp32:
            g = dy[rows].float() * (offset + weight.float())
            dw += (dy[rows].float() * xhat).sum(0)
        else:
            g = (dy[rows] * weight).float()
            dw += (dy[rows] * xhat.to(x.dtype)).sum(0, dtype=torch.float32)
        if dx is not None:
            dx[rows] = r2[rows] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, dw


def glu_ref(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """h = act(gate) * up, computed in float32 and rounded once to gate's dtype."""
    act, _ = GLU_ACTIVATIONS[activation](gate.float())
    return (act * up.float()).to(gate.dtype)


def cross_entropy_ref(
    logits: Tensor, targets: Tensor, scale: Tensor, softcap: float | None = None, ignore_index: int = -100
) -> Tensor:
    """Per-row losses (float32) of logits against targets (0 where ignored); the logits are overwritten
    with the gradient of sum(losses) * scale, in their dtype (softcap: z = c tanh(logits / c))."""
    valid = targets != ignore_index
    z = logits.float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    safe = targets.clamp_min(0)
    losses = (torch.logsumexp(z, dim=-1) - z.gather(1, safe[:, None]).squeeze(1)) * valid
    g = torch.softmax(z, dim=-1)
    g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
    g *= (valid * scale)[:, None]
    if softcap is not None:
        g *= 1 - (z / softcap) ** 2
    logits.copy_(g)
    return losses


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """x (B, H, S, D) rotated as Hugging Face's apply_rotary_pos_emb does, over its first R features
    (cos, sin: (B or 1, S, R)); inverse: the transposed rotation (the backward). float32 math, one
    rounding."""
    rotary = cos.shape[-1]
    x1, x2 = x[..., :rotary].float().chunk(2, dim=-1)
    c1, c2 = cos.float().unsqueeze(1).chunk(2, dim=-1)
    s1, s2 = sin.float().unsqueeze(1).chunk(2, dim=-1)
    if inverse:
        rotated = torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1], dim=-1)
    else:
        rotated = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))  # as x * cos would be
    out[..., :rotary] = rotated
    out[..., rotary:] = x[..., rotary:]
    return out


OPS.update(
    {
        op.name: op
        for op in (
            _op("rope", rope_ref, ("triton",), ()),
            _op("rms_norm_forward", rms_norm_forward_ref, ("triton",), ()),
            _op("rms_norm_backward", rms_norm_backward_ref, ("triton",), ()),
            _op("glu", glu_ref, ("triton",), ()),
            _op("cross_entropy_", cross_entropy_ref, ("triton",), ()),
        )
    }
)

rms_norm_forward = OPS["rms_norm_forward"]
rms_norm_backward = OPS["rms_norm_backward"]
glu = OPS["glu"]
cross_entropy_ = OPS["cross_entropy_"]
rope = OPS["rope"]
