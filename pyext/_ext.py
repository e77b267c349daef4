"""Validating wrapper around the compiled ``slimtune._C`` kernels.

``_C`` links nothing from torch: it only receives raw pointers, int64 shapes and strides (in
elements), a dtype code, a device index and a CUDA stream. Every check that keeps those pointers
safe therefore happens here, with messages that name the caller's arguments. Importing this
module never fails; ``available()`` and ``load_error()`` report whether the extension loaded.
The kernels bypass autograd and the tensors' version counters: callers own that bookkeeping.
idx values are range-checked (and, where written through, checked distinct) on CPU; a CUDA idx
cannot be read without a sync, so an out-of-range value traps the kernel like a device assert.
"""

from __future__ import annotations

import importlib
import operator
import os
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .ops import AdamWStep

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@cache
def _load() -> tuple[ModuleType | None, str | None]:
    """Import ``slimtune._C`` once, keeping the reason when it cannot be imported."""
    try:
        return importlib.import_module("._C", __package__), None
    except ImportError as err:
        if os.environ.get("SLIMTUNE_BUILD_EXT") == "0":
            return None, f"built with SLIMTUNE_BUILD_EXT=0 ({err})"
        return None, f"{type(err).__name__}: {err} (reinstall slimtune to build it)"


def available() -> bool:
    """Whether ``slimtune._C`` imported."""
    return _load()[0] is not None


def cuda_compiled() -> bool:
    """Whether ``slimtune._C`` imported and contains the CUDA kernels."""
    module = _load()[0]
    return module is not None and module.cuda_compiled()


def load_error() -> str | None:
    """Why ``slimtune._C`` could not be imported, or None when it was."""
    return _load()[1]


def _module() -> ModuleType:
    module, error = _load()
    if module is None:
        raise RuntimeError(f"slimtune._C is unavailable: {error}")
    return module


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float(name: str, t: object, dims: int | None = None) -> Tensor:
    """A float32/float16/bfloat16 tensor, optionally of a given rank."""
    t = _tensor(name, t)
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def _like(name: str, t: object, ref_name: str, ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor on ref's device with ref's dtype (or `dtype`)."""
    t = _tensor(name, t)
    dtype = ref.dtype if dtype is None else dtype
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype} (the dtype of {ref_name})")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return t


def _contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")


def _shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")


def _index(idx: object, ref_name: str, ref: Tensor) -> Tensor:
    """A contiguous 1-D int64 column index on ref's device."""
    idx = _like("idx", idx, ref_name, ref, torch.int64)
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
    _contiguous("idx", idx)
    return idx


def _target(name: str, t: Tensor) -> tuple[int, int]:
    """(device index, CUDA stream) for the kernel launch; (-1, 0) runs the CPU kernel."""
    if t.device.type == "cpu":
        return -1, 0
    if t.device.type == "cuda":
        if not _module().cuda_compiled():
            raise RuntimeError(f"{name} is a CUDA tensor but slimtune._C was built without CUDA")
        return t.device.index, torch.cuda.current_stream(t.device).cuda_stream
    raise ValueError(f"{name} is on {t.device}; slimtune._C kernels take CPU or CUDA tensors")


def gather_columns(x: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """out[n, j] = x[n, idx[j]] for x (N, K) of any strides; returns the contiguous (N, r) out."""
    module = _module()
    x = _float("x", x, dims=2)
    idx = _index(idx, "x", x)
    n, k = x.shape
    r = idx.numel()
    if out is None:
        out = torch.empty((n, r), dtype=x.dtype, device=x.device)
    else:
        out = _like("out", out, "x", x)
        _shape("out", out, (n, r))
        _contiguous("out", out)
    dense = (x.data_ptr(), n, k, *x.stride())
    selected = (idx.data_ptr(), r, out.data_ptr(), *out.stride())
    module.gather_columns(*dense, *selected, _DTYPE_CODES[x.dtype], *_target("x", x))
    return out


def scatter_columns(weight: Tensor, idx: Tensor, cols: Tensor) -> None:
    """weight[:, idx[j]] = cols[:, j] in place; any strides, idx must hold distinct columns."""
    module = _module()
    weight = _float("weight", weight, dims=2)
    idx = _index(idx, "weight", weight)
    cols = _like("cols", cols, "weight", weight)
    m, k = weight.shape
    r = idx.numel()
    _shape("cols", cols, (m, r))
    if r > k:
        raise ValueError(f"idx selects {r} columns but weight has only {k}; idx must hold distinct columns")
    dense = (weight.data_ptr(), m, k, *weight.stride())
    selected = (idx.data_ptr(), r, cols.data_ptr(), *cols.stride())
    module.scatter_columns(*dense, *selected, _DTYPE_CODES[weight.dtype], *_target("weight", weight))


def partial_adamw(
    cols: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weight: Tensor | None = None,
    idx: Tensor | None = None,
    *,
    hyper: AdamWStep,
) -> None:
    """One torch.optim.AdamW step (`hyper`) on `cols` (float32 math, float32 moments), fused with
    weight[:, idx[j]] = cols[:, j] so the dense weight stays in sync without a second pass.

    weight/idx None: plain AdamW update of `cols`.
    """
    module = _module()
    cols = _float("cols", cols)
    _contiguous("cols", cols)
    shape = tuple(cols.shape)
    for name, t, dtype in (
        ("grad", grad, cols.dtype),
        ("exp_avg", exp_avg, torch.float32),
        ("exp_avg_sq", exp_avg_sq, torch.float32),
    ):
        _shape(name, _like(name, t, "cols", cols, dtype), shape)
        _contiguous(name, t)
    step = operator.index(hyper.step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (updates so far including this one), got {step}")
    if (weight is None) != (idx is None):
        raise ValueError("weight and idx must be given together (or both None for a plain AdamW update)")
    weight_args = (0, 0, 0, 0, 0, 0)
    if weight is not None:
        if cols.dim() != 2:
            raise ValueError(f"cols must be 2-D (M, r) when weight is given, got shape {shape}")
        weight = _like("weight", weight, "cols", cols)
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        idx = _index(idx, "cols", cols)
        _shape("idx", idx, (shape[1],))
        if weight.shape[0] != shape[0]:
            raise ValueError(f"weight has {weight.shape[0]} rows but cols has {shape[0]}")
        if shape[1] > weight.shape[1]:
            raise ValueError(f"cols has {shape[1]} columns but weight has only {weight.shape[1]}")
        weight_args = (weight.data_ptr(), *weight.stride(), weight.shape[1], shape[1], idx.data_ptr())
    tensors = (cols.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), cols.numel())
    scalars = (float(hyper.lr), float(hyper.beta1), float(hyper.beta2), float(hyper.eps))
    settings = (step, *scalars, float(hyper.weight_decay), bool(hyper.maximize))
    module.partial_adamw(*tensors, _DTYPE_CODES[cols.dtype], *settings, *weight_args, *_target("cols", cols))
