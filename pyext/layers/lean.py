"""Lean stand-ins for the frozen parts of a decoder step: RMSNorm, the gated MLP, LM head + loss.

Each computes what the Hugging Face module computes (on the PyTorch path the forward runs the same
ops in the same dtypes; a kernel may round once where the module rounds twice) but keeps less for
backward. On CUDA each piece is one Triton kernel (`slimtune.library` ops: `rms_norm_forward`,
`rms_norm_backward`, `glu`, `glu_backward`, `cross_entropy_`); elsewhere their PyTorch references
run; on the meta device their fakes do (outputs only), which is what the accounting counts.

- `LeanRMSNorm` keeps its input in the model's dtype and the float32 inverse RMS (N floats), not
  the float32 copy of its input that HF's upcast leaves for autograd.
- `LeanGatedMLP` runs down(act(gate(x)) * up(x)) as one autograd function that keeps gate and up
  only (plus, for projections that train, what their gradient needs: x's trained columns for PaCA,
  x for trained rows or dense weights) and recomputes act(gate) and h in backward. A known
  activation (SiLU, GELU) runs as the kernels' formula; any other comes from the module and its
  derivative from autograd on the recomputed activation, so every activation is exact. For a
  partial down projection the trained columns of h come from the recomputed h: nothing of h is kept.
- `LeanLMHead` computes the LM head and the causal-LM cross-entropy in chunks of tokens, forming the
  gradient of each chunk in the forward (as fused linear cross-entropy kernels do): one chunk of
  logits in the model's dtype, overwritten in place by its gradient, so no float32 logits exist; it
  keeps only dL/dhidden (N x hidden, model dtype).
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import library, ops
from ..architectures import ROTARY_FUNCTION, rotary_function
from ..library import NORM_SOURCE, NormSource, as_rows
from .partial import COLUMNS, PartialLinear
from .precision import autocast_dtype, autocast_off, cast_floating
from .standin import StandIn

IGNORE_INDEX = -100
# Options of HF's causal-LM loss (name: the value that means "not used") the chunked loss does not
# implement; a call with any other value runs the model's own loss instead.
PLAIN_LOSS_OPTIONS = {"shift_labels": None, "ignore_index": IGNORE_INDEX}
BACKWARD_CHUNK = 4096  # tokens per step of the norm and MLP backward: bounds their temporaries


def _chunks(n: int) -> list[slice]:
    size = BACKWARD_CHUNK  # read per call, so tests can shrink it
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _accumulate(total: list, parts: tuple) -> None:
    for k, part in enumerate(parts):
        if part is not None:
            total[k] = part.float() if total[k] is None else total[k].add_(part.float())


# ---- RMSNorm ------------------------------------------------------------------------------------


class _RMSNormFn(torch.autograd.Function):
    """y = w * (x * rstd).to(dtype) ("scale after cast", Llama) or ((x * rstd) * (offset + w)).to(dtype)
    (Gemma: offset 1, scale in float32); rstd = rsqrt(mean(x^2) + eps) in float32. One kernel each way
    on CUDA (`library.rms_norm_forward`/`_backward`), the PyTorch reference elsewhere."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, offset: float, scale_in_fp32: bool) -> Tensor:
        ctx.kernels = ops.runs_kernel(ops.rms_norm_forward, x.device)
        forward = library.rms_norm_forward if ctx.kernels else ops.rms_norm_forward_ref
        y, rstd = forward(as_rows(x), weight, eps, offset, scale_in_fp32)
        ctx.save_for_backward(x, rstd, weight)
        ctx.offset, ctx.scale_in_fp32 = offset, scale_in_fp32
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, rstd, weight = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        backward = library.rms_norm_backward if ctx.kernels else ops.rms_norm_backward_ref
        dx, dw = backward(as_rows(dy), as_rows(x), weight, rstd, ctx.offset, ctx.scale_in_fp32, need_dx)
        return (
            dx.view(x.shape) if need_dx else None,
            dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


class LeanRMSNorm(nn.Module):
    """A Hugging Face RMSNorm whose backward keeps its input in the model's dtype and the float32 rstd.

    `flavor` is "llama" (weight * normed.to(dtype)) or "gemma" ((1 + weight) * normed in float32),
    chosen at `slimtune.lean` time by a numerical probe against the module's own forward.
    """

    def __init__(self, original: nn.Module, eps: float, flavor: str) -> None:
        super().__init__()
        self.__dict__["original"] = original
        self.weight = original.weight
        self.eps, self.flavor = eps, flavor

    def forward(self, x: Tensor) -> Tensor:
        gemma = self.flavor == "gemma"
        offset = 1.0 if gemma else 0.0
        y = _RMSNormFn.apply(x, self.weight, self.eps, offset, gemma)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # eager products may recompute y
            setattr(y, NORM_SOURCE, NormSource(x, self.weight, self.eps, offset, gemma, y._version))
        return y

    def restore(self) -> nn.Module:
        return self.original

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, flavor={self.flavor}, lean"


# ---- attention: the rotary embedding as one kernel each way ---------------------------------------


class _RotaryFn(torch.autograd.Function):
    """(q, k) rotated by the cos/sin tables; backward: the transposed rotation of their gradients."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return library.rope(q, cos, sin, False), library.rope(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None):
        cos, sin = ctx.saved_tensors
        grads = [None if g is None else library.rope(g, cos, sin, True).to(dtype)
                 for g, dtype in zip((dq, dk), ctx.dtypes, strict=True)]  # fmt: skip
        return *grads, None, None


class LeanRotary:
    """Stands for the `apply_rotary_pos_emb` an attention forward calls: one kernel each way for the
    usual call (q, k of (B, H, S, D); cos, sin of (B, S, R), which train nothing); any other call goes
    to the model's own function."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args, **kwargs):
        usual = not args and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"}
        if (
            usual
            and q.dim() == k.dim() == 4
            and cos.dim() == 3
            and not (cos.requires_grad or sin.requires_grad)
        ):
            return _RotaryFn.apply(q, k, cos, sin)
        return self.original(q, k, cos, sin, *args, **kwargs)


def _holds(cell: Any, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _copy_function(fn: Any, globals_: dict, closure: tuple | None) -> Any:
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__, new.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return new


def _rewired(fn: Any, name: str, value: Any) -> Any | None:
    """A copy of `fn`, and of each decorator around it (`__wrapped__`), whose innermost code reads
    `value` for the global `name`; None where a decorator does not hold the function it wraps in a
    closure cell. The model's own class and module are not touched."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        return _copy_function(fn, {**fn.__globals__, name: value}, fn.__closure__)
    new_inner = _rewired(inner, name, value)
    cells = fn.__closure__ or ()
    if new_inner is None or not any(_holds(c, inner) for c in cells):
        return None
    new = _copy_function(fn, fn.__globals__, tuple(types.CellType(new_inner) if _holds(c, inner) else c
                                                   for c in cells))  # fmt: skip
    new.__wrapped__ = new_inner
    return new


@functools.cache
def lean_forward(cls: type) -> Any | None:
    """The forward of attention class `cls` with its rotary function replaced by `LeanRotary` (built
    once per class and process, so a lean model that was pickled finds it again), or None."""
    original = rotary_function(cls)
    return None if original is None else _rewired(cls.forward, ROTARY_FUNCTION, LeanRotary(original))


class LeanAttention(StandIn):
    """An attention module whose rotary embedding runs as one kernel each way where a device has it
    (CUDA; the meta device, for the accounting); the rest is the module's own forward code, and
    elsewhere all of it is."""

    def forward(self, *args, **kwargs):
        cls = type(self.original)
        if ops.runs_kernel(ops.rope, next(self.parameters()).device):
            return lean_forward(cls)(self, *args, **kwargs)
        return cls.forward(self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"lean {type(self.original).__name__} (rotary kernel)"


# ---- gated MLP ------------------------------------------------------------------------------------


def _projection_parts(p: nn.Module) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, int]:
    """(weight, bias, trained tensor or None, index or None, axis) of a Linear or PartialLinear."""
    if isinstance(p, PartialLinear):
        return p.weight, p.bias, p.effective(), p.index, p.axis
    return p.weight, p.bias, None, None, COLUMNS


def _keep_input(x2: Tensor, weight: Tensor, trained: Tensor | None, index: Tensor | None, axis: int):
    """What a projection's weight gradient needs of its input: nothing, x's trained columns, or x."""
    if trained is not None and trained.requires_grad:
        return x2.index_select(1, index) if axis == COLUMNS else x2
    if weight.requires_grad:
        return x2
    return x2.new_empty(0)


def _projection_grads(g2: Tensor, kept: Tensor, weight: Tensor, bias, trained, index, axis):
    """(d weight, d bias, d trained) of y = x W^T + b from the output gradient g2 (rows x out), in the
    GEMM's dtype (accumulated over chunks of rows in float32 by the caller)."""
    dw = db = dt = None
    if trained is not None and trained.requires_grad:
        dt = g2.t() @ kept if axis == COLUMNS else g2.index_select(1, index).t() @ kept
    if weight.requires_grad:
        dw = g2.t() @ kept
    if bias is not None and bias.requires_grad:
        db = g2.sum(0, dtype=torch.float32)
    return dw, db, dt


def _kernel_path(kind: str | None, device: torch.device) -> bool:
    """Whether the gated activation runs as kernels: a known activation, and kernels on the device (or
    on the one the meta device stands for, `ops.meta_models`)."""
    return kind is not None and ops.runs_kernel(ops.glu, device)


def _gated_grads(ctx, outs: list[Tensor], dh: Tensor, need_h: bool) -> tuple[list[Tensor], Tensor | None]:
    """(the gradients of the input projections' outputs `outs`, h or None) of h = act(gate) * up for
    dh, written over `outs`, the saved gate and up of these rows (a second backward through the graph
    then fails by name: autograd sees its saved tensors modified), by one kernel on the kernel path
    or its reference elsewhere; for an activation the kernels do not know, autograd on the recomputed
    activation (exact for any activation)."""
    plan = ctx.plan
    gate, up = outs[0].chunk(2, dim=-1) if plan.fused else outs
    if _kernel_path(plan.kind, gate.device):
        h = library.glu_backward_(dh, gate, up, plan.kind, need_h)
        return outs, (h if need_h else None)
    if plan.kind is not None:  # the kernel's reference, in place as well (and no autograd.grad to trace)
        return outs, ops.glu_backward_ref(dh, gate, up, plan.kind, gate, up, need_h)
    with torch.enable_grad():
        g = gate.detach().requires_grad_(True)
        a = plan.act(g)
    h = a.detach() * up if need_h else None
    dup = dh * a.detach()
    (dgate,) = torch.autograd.grad(a, g, dh.mul_(up))  # dh is not needed after this: reuse it
    return ([torch.cat([dgate, dup], dim=-1)] if plan.fused else [dgate, dup]), h


@dataclass(frozen=True)
class _MLPPlan:
    """What the lean MLP's function needs besides tensors. `kind` names the activation for its kernels
    (None: the module `act` runs, and autograd differentiates it); `recompute_up`: keep no up output,
    recompute it in backward from the MLP's input (separate gate and up projections only)."""

    act: nn.Module
    kind: str | None
    fused: bool
    axes: tuple[int, ...]
    recompute_up: bool = False


def _stored_outputs(ctx, outs: list[Tensor], x: Tensor, x2: Tensor) -> list[Tensor]:
    """What backward keeps of the input projections' outputs: both, or (recompute_up) gate and the
    MLP's input as `library.keep_rows` keeps it (the lean norm's input, which the norm keeps anyway)."""
    return [outs[0], library.keep_rows(ctx, x, x2)] if ctx.plan.recompute_up else outs


def _outputs_of_rows(ctx, stored: tuple[Tensor, ...], up: tuple, rows: slice) -> list[Tensor]:
    """The input projections' outputs for these rows: read back, or up recomputed (a GEMM)."""
    if not ctx.plan.recompute_up:
        return [out[rows] for out in stored]
    gate, kept = stored
    x_rows = library.input_rows(ctx, as_rows(kept)[rows])
    weight, bias = up
    return [gate[rows], F.linear(x_rows.to(weight.dtype), weight, bias)]


class _LeanMLPFn(torch.autograd.Function):
    """down(act(gate(x)) * up(x)); per projection the tensors (weight, bias, trained, index)."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _MLPPlan, *parts):
        per = [parts[i : i + 4] for i in range(0, len(parts), 4)]
        x2 = as_rows(x)
        outs = [F.linear(x2, w, b) for w, b, _, _ in per[:-1]]
        gate, up = outs[0].chunk(2, dim=-1) if plan.fused else outs
        w_down, b_down, _, _ = per[-1]
        kernels = _kernel_path(plan.kind, x.device)
        y = x2.new_empty(x2.shape[0], w_down.shape[0], dtype=gate.dtype)  # mm needs one dtype
        for rows in _chunks(x2.shape[0]):  # h of one chunk of tokens at a time: it is never kept
            h = library.glu(gate[rows], up[rows], plan.kind) if kernels else plan.act(gate[rows]) * up[rows]
            if b_down is None:  # written into y's rows by the GEMM itself: no copy of the output
                torch.mm(h, w_down.t(), out=y[rows])
            else:
                torch.addmm(b_down, h, w_down.t(), out=y[rows])
            del h
        ctx.plan = plan
        stored = _stored_outputs(ctx, outs, x, x2)
        kept = [_keep_input(x2, w, t, i, a) for (w, _, t, i), a in zip(per[:-1], plan.axes[:-1], strict=True)]
        ctx.save_for_backward(*stored, *kept, *parts)
        ctx.n_stored, ctx.n_in, ctx.x_shape = len(stored), len(per) - 1, x.shape
        return y  # 2-D: the caller reshapes (a view made here could not be modified in place)

    @staticmethod
    def backward(ctx, dy: Tensor):
        saved, axes = ctx.saved_tensors, ctx.plan.axes
        stored, kept, parts = (
            saved[: ctx.n_stored],
            saved[ctx.n_stored : -4 * (ctx.n_in + 1)],
            saved[-4 * (ctx.n_in + 1) :],
        )
        per = [parts[i : i + 4] for i in range(0, len(parts), 4)]
        w_down, b_down, t_down, i_down = per[-1]
        down_trains = any(t is not None and t.requires_grad for t in (w_down, b_down, t_down))
        columns_only = t_down is not None and axes[-1] == COLUMNS and not w_down.requires_grad
        need_x = ctx.needs_input_grad[0]
        dx = dy.new_empty(dy.shape[0], ctx.x_shape[-1]) if need_x else None
        totals = [[None, None, None] for _ in per]
        for rows in _chunks(dy.shape[0]):  # the temporaries (N x I each) of one chunk at a time
            dyc = dy[rows]
            dh = dyc @ w_down.to(dyc.dtype)
            outs = _outputs_of_rows(ctx, stored, per[-2][:2], rows)
            d_outs, h = _gated_grads(ctx, outs, dh, down_trains)
            if down_trains:
                down = (w_down, b_down, t_down, i_down, axes[-1])
                h = h.index_select(1, i_down) if columns_only else _keep_input(h, w_down, *down[2:])
                _accumulate(totals[-1], _projection_grads(dyc, h, *down))
            del h, dh, outs
            if need_x:
                dx[rows] = sum(d @ w.to(d.dtype) for d, (w, _, _, _) in zip(d_outs, per[:-1], strict=True))
            for total, d, k, (w, b, t, i), axis in zip(
                totals, d_outs, kept, per[:-1], axes[:-1], strict=False
            ):
                _accumulate(total, _projection_grads(d, k[rows] if k.numel() else k, w, b, t, i, axis))
        flat = []
        for (dw, db, dt), (w, b, t, _) in zip(totals, per, strict=True):
            flat += [_cast(dw, w), _cast(db, b), _cast(dt, t), None]
        return (None if dx is None else dx.view(ctx.x_shape), None, *flat)


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.to(like.dtype)


class LeanGatedMLP(StandIn):
    """Stands in for a Hugging Face gated MLP whose projections are frozen, dense-trainable or partial
    (PaCA/S2FT) linears: one autograd function keeping gate and up (see the module docstring).
    Adapter projections (LoRA, Hydra) take their own fused path.
    """

    def __init__(
        self, original: nn.Module, inputs: Sequence[str], down: str, activation: str, kind: str | None = None
    ) -> None:
        super().__init__(original)
        self.inputs, self.down, self.activation = tuple(inputs), down, activation
        self.kind = kind  # a key of ops.GLU_ACTIVATIONS: its kernels run where a device has them
        self.recompute_up = False  # set by slimtune.lean(recompute=...) on separate gate/up projections

    def forward(self, x: Tensor) -> Tensor:
        projections = [getattr(self, n) for n in (*self.inputs, self.down)]
        if not all(type(p) is nn.Linear or isinstance(p, PartialLinear) for p in projections):
            return type(self.original).forward(self, x)  # e.g. adapters swapped in since: the model's code
        parts, axes = [], []
        for p in projections:
            if isinstance(p, PartialLinear):
                p.prepare_forward()
            weight, bias, trained, index, axis = _projection_parts(p)
            parts += [weight, bias, trained, index]
            axes.append(axis)
        fused = len(self.inputs) == 1
        plan = _MLPPlan(
            getattr(self, self.activation), self.kind, fused, tuple(axes), self.recompute_up and not fused
        )
        dtype = autocast_dtype(x.device.type)
        if dtype is None:
            y = _LeanMLPFn.apply(x, plan, *parts)
        else:  # the casts autocast would make, up front (see layers/precision.py)
            with autocast_off(x.device.type):
                parts = [cast_floating(t, dtype) for t in parts]
                y = _LeanMLPFn.apply(x.to(dtype), plan, *parts)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"lean {type(self.original).__name__}"


# ---- LM head + cross-entropy in chunks ----------------------------------------------------------------


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean token cross-entropy of softcap(h W^T) against targets, chunk by chunk; the gradients of
    h (and W, if it trains) are formed in the forward and scaled by the incoming gradient later. Each
    chunk's logits are one buffer in the model's dtype that `library.cross_entropy_` overwrites with
    their gradient (one kernel on CUDA): no float32 logits exist."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, softcap: float | None, chunk: int,
                normalizer: Tensor | float | None) -> Tensor:  # fmt: skip
        valid = targets != IGNORE_INDEX
        # A tensor, not a Python float: reading the count back would sync the device every step. No
        # target at all gives 0/0 = NaN, as the mean cross-entropy of the plain model does.
        count = (
            valid.sum().float()
            if normalizer is None
            else torch.as_tensor(normalizer, dtype=torch.float32, device=h.device)
        )
        per_target = count.reciprocal().nan_to_num(posinf=0.0)  # the gradient of no target is 0, as plain
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        scale = per_target.reshape(1)
        cross_entropy_ = (
            library.cross_entropy_ if ops.runs_kernel(ops.cross_entropy_, h.device) else ops.cross_entropy_ref
        )
        for start in range(0, h.shape[0], chunk):
            hc = h[start : start + chunk]
            z = F.linear(hc, weight)  # one chunk of logits in the model's dtype, then its gradient
            losses = cross_entropy_(z, targets[start : start + chunk], scale, softcap, IGNORE_INDEX)
            loss += losses.sum()
            if need_h:
                dh[start : start + chunk] = z @ weight
            if need_w:
                dw += z.t() @ hc
            del z  # before the next chunk's logits exist: one chunk at a time
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.need, ctx.weight_dtype = (need_h, need_w), weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        need_h, need_w = ctx.need
        tensors = list(ctx.saved_tensors)
        dh = dw = None
        if need_h:
            dh = tensors.pop(0)
            dh = dh * grad.to(dh.dtype)
        if need_w:
            dw = (tensors.pop(0) * grad).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


class LeanLMHead(nn.Module):
    """The LM head (same weight, tied or not) computing the causal-LM loss in chunks when the model is
    called with labels; without labels (evaluation, generation) it is the plain linear.

    `slimtune.lean` installs hooks on the causal LM that divert `labels` (and `num_items_in_batch`) to
    this module and put the loss on the output; that output then has `logits=None`: the logits of the
    whole batch are what lean mode avoids.
    """

    def __init__(self, original: nn.Linear, softcap: float | None, chunk: int = 1024) -> None:
        super().__init__()
        self.__dict__["original"] = original
        self.weight = original.weight
        self.in_features, self.out_features = original.in_features, original.out_features
        self.softcap, self.chunk = softcap, chunk
        self._pending: tuple[Tensor, Any] | None = None
        self._loss: Tensor | None = None

    def divert_labels(self, module: nn.Module, args: tuple, kwargs: dict):
        labels = kwargs.get("labels")
        if labels is None:
            return None
        unknown = [k for k, plain in PLAIN_LOSS_OPTIONS.items() if kwargs.get(k, plain) != plain]
        if unknown:  # the model's own loss runs: the batch's logits are formed, and that is said once
            if not self.__dict__.get("_said"):
                warnings.warn(
                    f"slimtune.lean: the chunked LM-head loss does not implement {', '.join(unknown)}; "
                    "the model's own loss runs (with the batch's logits) for such calls",
                    stacklevel=2,
                )
                self.__dict__["_said"] = True
            return None
        self._pending = (labels, kwargs.get("num_items_in_batch"))
        return args, {**kwargs, "labels": None}

    def attach_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self._loss is None:
            return None
        output["loss"], output["logits"] = self._loss, None
        self._loss = None
        return output

    def forward(self, hidden: Tensor) -> Tensor:
        if self._pending is None:
            return F.linear(hidden, self.weight)
        labels, normalizer = self._pending
        self._pending = None
        # Token t predicts label t + 1 (HF's ForCausalLMLoss); the last position predicts nothing.
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
        fn = _ChunkedLinearCrossEntropy
        self._loss = fn.apply(as_rows(hidden), self.weight, targets, self.softcap, self.chunk, normalizer)
        return hidden.new_empty(*hidden.shape[:-1], 0)  # stands in for the logits; replaced by None

    def restore(self) -> nn.Linear:
        return self.original

    def extra_repr(self) -> str:
        cap = f", softcap={self.softcap}" if self.softcap is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, chunk={self.chunk}{cap}"
