"""slimtune's kernels and layer products as `torch.library` custom ops (namespace `slimtune`).

Each op has a fake (meta) implementation, so Dynamo and AOTAutograd trace through slimtune layers
without graph breaks, and the layer products carry their autograd formulas. Inside an op the
backend is chosen per device (`ops.Op`): Triton, CUDA or C++ kernels, or the PyTorch reference.

Ops assume valid input: indices are validated once, where they enter slimtune (a layer's
construction, or the public wrappers in `slimtune.ops`), with `ops.check_index`.

Layer products return the tensors their backward needs as extra outputs (custom ops may save only
inputs and outputs): `partial_linear` returns the compact columns of x next to y, `lora_project`
the adapter activations u. Callers use the first output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

COLUMNS, ROWS = 1, 0


def as_rows(t: Tensor) -> Tensor:
    """The tensor as (tokens, features): every leading dimension folded into one."""
    return t.reshape(-1, t.shape[-1])


# ---- kernels ------------------------------------------------------------------------------------


@torch.library.custom_op("slimtune::gather_columns", mutates_args=())
def gather_columns(x: Tensor, index: Tensor) -> Tensor:
    """out[n, j] = x[n, index[j]] (contiguous N x r)."""
    return ops.gather_columns.run(x, index)


@gather_columns.register_fake
def _(x: Tensor, index: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], index.shape[0])


def _write_trained(weight: Tensor, index: Tensor, trained: Tensor, axis: int) -> None:
    trained = trained.to(weight.dtype)  # a float32 master is rounded once, here
    if axis == COLUMNS:
        ops.scatter_columns.run(weight, index, trained)
    else:
        ops.scatter_columns.run(weight.t(), index, trained.t())


@torch.library.custom_op("slimtune::write_trained_", mutates_args=("weight",))
def write_trained_(weight: Tensor, index: Tensor, trained: Tensor, axis: int) -> None:
    """weight[:, index] = trained (columns, axis 1) or weight[index, :] = trained (rows, axis 0)."""
    _write_trained(weight, index, trained, axis)


@write_trained_.register_fake
def _(weight: Tensor, index: Tensor, trained: Tensor, axis: int) -> None:
    return None


@torch.library.custom_op("slimtune::column_grad", mutates_args=())
def column_grad(dy: Tensor, x: Tensor, index: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """dy^T @ x[:, index] (index None: dy^T @ x), float32 accumulation, in `out_dtype`."""
    return ops.column_grad.run(dy, x, index, out_dtype)


@column_grad.register_fake
def _(dy: Tensor, x: Tensor, index: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    width = x.shape[1] if index is None else index.shape[0]
    return dy.new_empty(dy.shape[1], width, dtype=out_dtype)


@torch.library.custom_op("slimtune::partial_adamw_", mutates_args=("cols", "exp_avg", "exp_avg_sq", "weight"))
def partial_adamw_(
    cols: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weight: Tensor | None,
    index: Tensor | None,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One AdamW step of `cols` (float32 math and moments), fused with weight[:, index] = cols. The
    hyperparameters are flat here because an op schema takes only plain types."""
    hyper = ops.AdamWStep(step, lr, beta1, beta2, eps, weight_decay, maximize)
    ops.partial_adamw.run(cols, grad, exp_avg, exp_avg_sq, weight, index, hyper=hyper)


@partial_adamw_.register_fake
def _(*args: object) -> None:
    return None


@torch.library.custom_op("slimtune::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, b: Tensor) -> Tensor:
    """x W^T + bias + u b^T for 2-D x."""
    return ops.lora_linear.run(x, weight, bias, u, b)


@lora_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, b: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("slimtune::lora_input_grad", mutates_args=())
def lora_input_grad(g: Tensor, a: Tensor, dys: list[Tensor], weights: list[Tensor]) -> Tensor:
    """sum_i dy_i W_i + g a."""
    return ops.lora_input_grad.run(g, a, list(dys), list(weights))


@lora_input_grad.register_fake
def _(g: Tensor, a: Tensor, dys: list[Tensor], weights: list[Tensor]) -> Tensor:
    return g.new_empty(g.shape[0], a.shape[1])


@torch.library.custom_op("slimtune::glu_down", mutates_args=())
def glu_down(gate: Tensor, up: Tensor, a: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """h = act(gate) * up and u = h a^T."""
    h, u = ops.glu_down.run(gate, up, a, activation)
    return h, u


@glu_down.register_fake
def _(gate: Tensor, up: Tensor, a: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape[0], a.shape[0])


def _glu_backward_packed(dh: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    n, i = gate.shape
    packed = torch.empty(n, 2 * i, dtype=gate.dtype, device=gate.device)
    dgate, dup = packed.chunk(2, dim=1)
    h = ops.glu_backward.run(dh, gate, up, activation, dgate, dup)
    return packed, h


@torch.library.custom_op("slimtune::glu_backward", mutates_args=())
def glu_backward(dh: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """([dgate | dup] as one N x 2I tensor, recomputed h): dgate = dh up act'(gate), dup = dh act(gate)."""
    return _glu_backward_packed(dh, gate, up, activation)


@glu_backward.register_fake
def _(dh: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape[0], 2 * gate.shape[1]), gate.new_empty(gate.shape)


# ---- the lean frozen path: one kernel each on CUDA, the PyTorch reference elsewhere ----------------
# On the meta device the fakes run: outputs only, as the fused kernels allocate (the accounting's view).


@torch.library.custom_op("slimtune::rms_norm_forward", mutates_args=())
def rms_norm_forward(
    x: Tensor, weight: Tensor, eps: float, offset: float, scale_in_fp32: bool
) -> tuple[Tensor, Tensor]:
    """(y, float32 rstd) of the rows of x; see `ops.rms_norm_forward_ref`."""
    return ops.rms_norm_forward.run(x, weight, eps, offset, scale_in_fp32)


@rms_norm_forward.register_fake
def _(x: Tensor, weight: Tensor, eps: float, offset: float, scale_in_fp32: bool) -> tuple[Tensor, Tensor]:
    dtype = x.dtype if scale_in_fp32 else torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("slimtune::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float, scale_in_fp32: bool, need_dx: bool
) -> tuple[Tensor, Tensor]:
    """(dx, or an empty tensor when not needed; d weight in float32)."""
    dx, dw = ops.rms_norm_backward.run(dy, x, weight, rstd, offset, scale_in_fp32, need_dx)
    return (x.new_empty(0) if dx is None else dx), dw


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, offset, scale_in_fp32, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, weight.new_empty(weight.shape, dtype=torch.float32)


@torch.library.custom_op("slimtune::glu_backward_", mutates_args=("gate", "up"))
def glu_backward_(dh: Tensor, gate: Tensor, up: Tensor, activation: str, need_h: bool) -> Tensor:
    """gate becomes dgate = dh up act'(gate) and up becomes dup = dh act(gate), in place (the lean MLP's
    backward, whose saved gate and up are not read again); returns the recomputed h where asked, else
    an empty tensor."""
    h = ops.glu_backward.run(dh, gate, up, activation, gate, up, need_h)
    return gate.new_empty(0) if h is None else h


@glu_backward_.register_fake
def _(dh: Tensor, gate: Tensor, up: Tensor, activation: str, need_h: bool) -> Tensor:
    return gate.new_empty(gate.shape if need_h else (0,))


@torch.library.custom_op("slimtune::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """x rotated by the tables (or by their transpose: the backward); see `ops.rope_ref`."""
    return ops.rope.run(x, cos, sin, inverse)


@rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))


@torch.library.custom_op("slimtune::glu", mutates_args=())
def glu(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """h = act(gate) * up."""
    return ops.glu.run(gate, up, activation)


@glu.register_fake
def _(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    return gate.new_empty(gate.shape)


@torch.library.custom_op("slimtune::cross_entropy_", mutates_args=("logits",))
def cross_entropy_(
    logits: Tensor, targets: Tensor, scale: Tensor, softcap: float | None, ignore_index: int
) -> Tensor:
    """Per-row losses; the logits become the gradient of sum(losses) * scale, in place."""
    return ops.cross_entropy_.run(logits, targets, scale, softcap, ignore_index)


@cross_entropy_.register_fake
def _(logits: Tensor, targets: Tensor, scale: Tensor, softcap: float | None, ignore_index: int) -> Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


# ---- the layer products' math, over a set of kernels ----------------------------------------------
#
# Each layer product is written once, as forward and backward functions over a `Kernels` set, and
# runs two ways: eagerly as a torch.autograd.Function calling the kernels directly (no custom-op
# dispatch in the hot path), and under torch.compile as a custom op whose registered backward
# calls the kernels as custom ops (so AOTAutograd can trace it). `run_*` picks the way.


@dataclass(frozen=True)
class Kernels:
    gather_columns: Callable[..., Tensor]
    column_grad: Callable[..., Tensor]
    lora_linear: Callable[..., Tensor]
    lora_input_grad: Callable[..., Tensor]
    glu_down: Callable[..., tuple[Tensor, Tensor]]
    glu_grads: Callable[..., tuple[list[Tensor], Tensor]]  # (dh, outs, activation) -> (d_outs, h)


def _direct(name: str) -> Callable[..., Tensor]:
    """The op's backend dispatch, looked up per call (so accounting can wrap `Op.run`)."""

    def call(*args, **kwargs):
        return ops.OPS[name].run(*args, **kwargs)

    return call


def _gate_up(outs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    return outs[0].chunk(2, dim=-1) if len(outs) == 1 else outs  # gate_up_proj: gate first


def _glu_grads_in_place(dh: Tensor, outs: Sequence[Tensor], activation: str) -> tuple[list[Tensor], Tensor]:
    """Eager: the gate and up gradients written over the saved gate and up outputs, which backward
    does not read again (a second backward through the graph fails by name), and h recomputed."""
    gate, up = _gate_up(outs)
    h = ops.glu_backward.run(dh, gate, up, activation, gate, up, True)
    return list(outs), h


def _glu_grads_packed(dh: Tensor, outs: Sequence[Tensor], activation: str) -> tuple[list[Tensor], Tensor]:
    """Traced: a functional op (new [dgate | dup] and h)."""
    packed, h = glu_backward(dh, *_gate_up(outs), activation)
    return ([packed] if len(outs) == 1 else list(packed.chunk(2, dim=1))), h


DIRECT = Kernels(
    _direct("gather_columns"),
    _direct("column_grad"),
    _direct("lora_linear"),
    _direct("lora_input_grad"),
    _direct("glu_down"),
    _glu_grads_in_place,
)
TRACEABLE = Kernels(gather_columns, column_grad, lora_linear, lora_input_grad, glu_down, _glu_grads_packed)


def _partial_forward(
    k: Kernels, x, weight, bias, index, axis: int, keep: bool
) -> tuple[Tensor, Tensor | None]:
    """y = x W^T + b and, for trained columns, the compact x[..., index] that backward keeps."""
    y = F.linear(x, weight, bias)
    kept = k.gather_columns(as_rows(x), index).to(y.dtype) if keep and axis == COLUMNS else None
    return y, kept


def _partial_backward(
    k: Kernels, dy, kept, index, weight, axis, x_shape, trained_dtype, need_x, need_trained
):
    """(dx through the dense weight, d(trained): dy^T x[:, idx] for columns, (dy[:, idx])^T x for rows)."""
    grad_x = grad_trained = None
    if need_x:
        grad_x = dy.matmul(weight.to(dy.dtype)).reshape(x_shape)
    if need_trained:
        dy2 = as_rows(dy)
        if axis == COLUMNS:
            grad_trained = k.column_grad(dy2, kept.to(dy.dtype), None, trained_dtype)
        else:
            grad_trained = k.column_grad(as_rows(kept).to(dy.dtype), dy2, index, trained_dtype).t()
    return grad_x, grad_trained


def _project(k: Kernels, x2, xa2, a, weights, biases, bs, ranks) -> tuple[list[Tensor], Tensor]:
    """Outputs of projections sharing the 2-D input x; u = xa a^T is one GEMM for all adapters."""
    u = xa2 @ a.t()
    outs, start = [], 0
    for weight, bias, b, r in zip(weights, biases, bs, ranks, strict=True):
        outs.append(k.lora_linear(x2, weight, bias, u[:, start : start + r], b))
        start += r
    return outs, u


def _project_backward(k: Kernels, dys, xa, u, a, weights, bs, ranks, shares_input: bool, need_x: bool):
    """(dx, dxa, da, dbs). With dropout (xa is not x) the adapter's input gradient comes apart."""
    gs, dbs, start = [], [], 0
    for dy, b, r in zip(dys, bs, ranks, strict=True):
        gs.append(dy @ b)
        dbs.append(dy.t() @ u[:, start : start + r])
        start += r
    g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
    da = g.t() @ xa
    dx = dxa = None
    if shares_input:
        dx = k.lora_input_grad(g, a, list(dys), list(weights)) if need_x else None
    else:
        dx = sum(dy @ w for dy, w in zip(dys, weights, strict=True)) if need_x else None
        dxa = g @ a
    return dx, dxa, da, dbs


def _gated_forward(
    k: Kernels, x2, a_in, a_down, b_down, w_down, bias_down, activation, ranks, weights, biases, bs
):
    """(y, gate/up outputs, u of the inputs' adapters, u of the down adapter); h is not kept."""
    outs, u = _project(k, x2, x2, a_in, weights, biases, bs, ranks)
    gate, up = _gate_up(outs)
    h, u_down = k.glu_down(gate, up, a_down, activation)
    return k.lora_linear(h, w_down, bias_down, u_down, b_down), outs, u, u_down


def _gated_backward(k: Kernels, dy, x2, u, a_in, a_down, b_down, w_down, u_down, outs, weights, bs, ranks,
                    activation, need_x):  # fmt: skip
    """(dx, da_in, da_down, db_down, dbs); h = act(gate) * up is recomputed, not read back."""
    g_down = dy @ b_down
    db_down = dy.t() @ u_down
    dh = k.lora_input_grad(g_down, a_down, [dy], [w_down])
    d_outs, h = k.glu_grads(dh, outs, activation)
    del dh
    da_down = g_down.t() @ h
    del h
    dx, _, da_in, dbs = _project_backward(k, d_outs, x2, u, a_in, weights, bs, ranks, True, need_x)
    return dx, da_in, da_down, db_down, dbs


# ---- inputs recomputed from what a lean RMSNorm keeps -----------------------------------------------

NORM_SOURCE = "_slimtune_norm_source"


@dataclass(frozen=True)
class NormSource:
    """A lean RMSNorm's output, recomputable from the norm's input, which the norm keeps for its own
    backward: a product reading the output keeps that input (no new memory) instead of the output
    (LoRA's adapted inputs: q/k/v and gate/up each share one) and recomputes it, one elementwise pass,
    in backward. `version`: the output's, when made (an in-place change since disowns it)."""

    x: Tensor
    weight: Tensor
    eps: float
    offset: float
    scale_in_fp32: bool
    version: int

    def output_rows(self, x: Tensor) -> Tensor:
        """The norm's output, as (tokens, features), from its input `x` (as saved)."""
        kernels = ops.runs_kernel(ops.rms_norm_forward, x.device)
        forward = rms_norm_forward if kernels else ops.rms_norm_forward_ref
        return forward(as_rows(x), self.weight, self.eps, self.offset, self.scale_in_fp32)[0]


def norm_source(t: Tensor) -> NormSource | None:
    """The lean norm `t` came out of, unchanged since, or None."""
    source = getattr(t, NORM_SOURCE, None)
    return source if source is not None and t._version == source.version else None


def keep_rows(ctx, x: Tensor, x2: Tensor, recomputable: bool = True) -> Tensor:
    """What a product keeps for its input x (x2: its rows): the input of the lean norm x came from
    (`ctx.norm` says which), or x2 itself."""
    ctx.norm = norm_source(x) if recomputable else None
    return x2 if ctx.norm is None else ctx.norm.x


def input_rows(ctx, kept: Tensor) -> Tensor:
    """The input's rows back from what `keep_rows` kept (rows of it: row-wise, so any slice works)."""
    return kept if ctx.norm is None else ctx.norm.output_rows(kept)


# ---- eager: autograd Functions calling the kernels directly -------------------------------------


class _PartialLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, trained, index, axis: int, keep: bool):
        y, kept = _partial_forward(DIRECT, x, weight, bias, index, axis, keep)
        ctx.save_for_backward(kept if axis == COLUMNS else x, index)
        ctx.weight = weight  # by reference: a later sync writes its trained entries in place
        ctx.axis, ctx.x_shape, ctx.trained_dtype = axis, x.shape, trained.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        kept, index = ctx.saved_tensors
        need_x, need_trained = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grads = _partial_backward(
            DIRECT,
            dy,
            kept,
            index,
            ctx.weight,
            ctx.axis,
            ctx.x_shape,
            ctx.trained_dtype,
            need_x,
            need_trained,
        )
        return grads[0], None, None, grads[1], None, None, None


class _ProjectFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xa, a, ranks, *per_projection):
        weights, biases, bs = per_projection[0::3], per_projection[1::3], per_projection[2::3]
        x2 = as_rows(x)
        xa2 = x2 if xa is None else as_rows(xa)
        outs, u = _project(DIRECT, x2, xa2, a, weights, biases, bs, ranks)
        kept = keep_rows(ctx, x, xa2, recomputable=xa is None)  # dropout's output is no norm's
        ctx.save_for_backward(kept, u, a, *weights, *bs)
        ctx.ranks, ctx.shares_input, ctx.x_shape = ranks, xa is None, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *d_outs):
        kept, u, a, *rest = ctx.saved_tensors
        xa = input_rows(ctx, kept)
        n = len(ctx.ranks)
        dx, dxa, da, dbs = _project_backward(
            DIRECT, d_outs, xa, u, a, rest[:n], rest[n:], ctx.ranks, ctx.shares_input, ctx.needs_input_grad[0]
        )
        dx = None if dx is None else dx.reshape(ctx.x_shape)
        dxa = None if dxa is None else dxa.reshape(ctx.x_shape)
        return dx, dxa, da, None, *(g for db in dbs for g in (None, None, db))


class _GatedMLPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a_in, a_down, b_down, w_down, bias_down, activation, ranks, *per_projection):
        weights, biases, bs = per_projection[0::3], per_projection[1::3], per_projection[2::3]
        x2 = as_rows(x)
        y, outs, u, u_down = _gated_forward(
            DIRECT, x2, a_in, a_down, b_down, w_down, bias_down, activation, ranks, weights, biases, bs
        )
        ctx.save_for_backward(
            keep_rows(ctx, x, x2), u, a_in, a_down, b_down, w_down, u_down, *outs, *weights, *bs
        )
        ctx.ranks, ctx.activation, ctx.x_shape = ranks, activation, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        kept, u, a_in, a_down, b_down, w_down, u_down, *rest = ctx.saved_tensors
        x2 = input_rows(ctx, kept)
        n = len(ctx.ranks)
        dx, da_in, da_down, db_down, dbs = _gated_backward(
            DIRECT, dy, x2, u, a_in, a_down, b_down, w_down, u_down, rest[:n], rest[n : 2 * n], rest[2 * n :],
            ctx.ranks, ctx.activation, ctx.needs_input_grad[0],
        )  # fmt: skip
        dx = None if dx is None else dx.reshape(ctx.x_shape)
        return (
            dx,
            da_in,
            da_down,
            db_down,
            None,
            None,
            None,
            None,
            *(g for db in dbs for g in (None, None, db)),
        )


# ---- compiled: the same products as custom ops with registered autograd --------------------------


@torch.library.custom_op("slimtune::partial_linear", mutates_args=())
def partial_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, trained: Tensor, index: Tensor, axis: int, keep: bool
) -> tuple[Tensor, Tensor]:
    """(x W^T + b, x[..., index] as N x r when `keep` and axis is columns, else an empty tensor).

    `trained` is an input only for autograd: the weight already holds its values (see
    `PartialLinear.sync_`), so the forward is one dense GEMM.
    """
    y, kept = _partial_forward(DIRECT, x, weight, bias, index, axis, keep)
    return y, x.new_empty(0, dtype=y.dtype) if kept is None else kept


@partial_linear.register_fake
def _(x, weight, bias, trained, index, axis, keep):
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    if keep and axis == COLUMNS:
        return y, x.new_empty(x.numel() // x.shape[-1], index.shape[0])
    return y, x.new_empty(0)


def _partial_linear_setup(ctx, inputs, output) -> None:
    x, weight, _, trained, index, axis, _ = inputs
    ctx.axis, ctx.x_shape, ctx.trained_dtype = axis, x.shape, trained.dtype
    # Rows need the whole input (a dense weight gradient would); columns their compact copy.
    ctx.save_for_backward(output[1] if axis == COLUMNS else x, index)
    ctx.weight = weight  # by reference: a later sync writes its trained entries in place


def _partial_linear_backward(ctx, dy: Tensor, _dkept: Tensor | None):
    kept, index = ctx.saved_tensors
    grad_x, grad_trained = _partial_backward(
        TRACEABLE, dy, kept, index, ctx.weight, ctx.axis, ctx.x_shape, ctx.trained_dtype,
        ctx.needs_input_grad[0], ctx.needs_input_grad[3],
    )  # fmt: skip
    return grad_x, None, None, grad_trained, None, None, None


partial_linear.register_autograd(_partial_linear_backward, setup_context=_partial_linear_setup)


def _no_grads(biases: list[Tensor | None]) -> list[None] | None:
    """The frozen biases' gradient, shaped as torch.library expects: a list only if none is None."""
    return None if any(b is None for b in biases) else [None] * len(biases)


@torch.library.custom_op("slimtune::lora_project", mutates_args=())
def lora_project(
    x: Tensor,
    xa: Tensor | None,
    a: Tensor,
    ranks: Sequence[int],
    weights: list[Tensor],
    biases: list[Tensor | None],
    bs: list[Tensor],
) -> tuple[list[Tensor], Tensor]:
    """Outputs x W_i^T + bias_i + u_i b_i^T (2-D) of projections reading x, and u = xa a^T (xa None: x)."""
    x2 = as_rows(x)
    return _project(DIRECT, x2, x2 if xa is None else as_rows(xa), a, weights, biases, bs, ranks)


@lora_project.register_fake
def _(x, xa, a, ranks, weights, biases, bs):
    n = x.numel() // x.shape[-1]
    return [x.new_empty(n, w.shape[0]) for w in weights], x.new_empty(n, a.shape[0])


def _lora_project_setup(ctx, inputs, output) -> None:
    x, xa, a, ranks, weights, biases, bs = inputs
    ctx.ranks, ctx.shares_input, ctx.x_shape, ctx.count = tuple(ranks), xa is None, x.shape, len(ranks)
    ctx.no_bias_grads = _no_grads(biases)
    ctx.save_for_backward(x if xa is None else xa, output[1], a, *weights, *bs)


def _lora_project_backward(ctx, d_outs: list[Tensor], _du: Tensor | None):
    xa, u, a, *rest = ctx.saved_tensors
    n = ctx.count
    dx, dxa, da, dbs = _project_backward(
        TRACEABLE, d_outs, as_rows(xa), u, a, rest[:n], rest[n:], ctx.ranks, ctx.shares_input,
        ctx.needs_input_grad[0],
    )  # fmt: skip
    dx = None if dx is None else dx.reshape(ctx.x_shape)
    dxa = None if dxa is None else dxa.reshape(ctx.x_shape)
    return dx, dxa, da, None, [None] * n, ctx.no_bias_grads, dbs


lora_project.register_autograd(_lora_project_backward, setup_context=_lora_project_setup)


@torch.library.custom_op("slimtune::lora_gated_mlp", mutates_args=())
def lora_gated_mlp(
    x: Tensor,
    a_in: Tensor,
    a_down: Tensor,
    b_down: Tensor,
    w_down: Tensor,
    bias_down: Tensor | None,
    activation: str,
    ranks: Sequence[int],
    weights: list[Tensor],
    biases: list[Tensor | None],
    bs: list[Tensor],
) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """(down(act(gate(x)) * up(x)) as 2-D with every adapter fused, and what backward keeps: the
    gate/up outputs (one packed gate_up output for Phi-3), u of the inputs' adapters, u of the down
    adapter). h = act(gate) * up is recomputed in backward instead of being kept."""
    return _gated_forward(
        DIRECT, as_rows(x), a_in, a_down, b_down, w_down, bias_down, activation, ranks, weights, biases, bs
    )


@lora_gated_mlp.register_fake
def _(x, a_in, a_down, b_down, w_down, bias_down, activation, ranks, weights, biases, bs):
    n = x.numel() // x.shape[-1]
    outs = [x.new_empty(n, w.shape[0]) for w in weights]
    return (
        x.new_empty(n, w_down.shape[0]),
        outs,
        x.new_empty(n, a_in.shape[0]),
        x.new_empty(n, a_down.shape[0]),
    )


def _gated_mlp_setup(ctx, inputs, output) -> None:
    x, a_in, a_down, b_down, w_down, _, activation, ranks, weights, biases, bs = inputs
    _, outs, u, u_down = output
    ctx.ranks, ctx.activation, ctx.x_shape, ctx.count = tuple(ranks), activation, x.shape, len(ranks)
    ctx.no_bias_grads = _no_grads(biases)
    ctx.save_for_backward(x, u, a_in, a_down, b_down, w_down, u_down, *outs, *weights, *bs)


def _gated_mlp_backward(ctx, dy: Tensor, *_unused):
    x, u, a_in, a_down, b_down, w_down, u_down, *rest = ctx.saved_tensors
    n = ctx.count
    dx, da_in, da_down, db_down, dbs = _gated_backward(
        TRACEABLE, dy, as_rows(x), u, a_in, a_down, b_down, w_down, u_down, rest[:n], rest[n : 2 * n],
        rest[2 * n :], ctx.ranks, ctx.activation, ctx.needs_input_grad[0],
    )  # fmt: skip
    dx = None if dx is None else dx.reshape(ctx.x_shape)
    return dx, da_in, da_down, db_down, None, None, None, None, [None] * n, ctx.no_bias_grads, dbs


lora_gated_mlp.register_autograd(_gated_mlp_backward, setup_context=_gated_mlp_setup)


# ---- what the layers call ------------------------------------------------------------------------


def run_write_trained(weight: Tensor, index: Tensor, trained: Tensor, axis: int) -> None:
    """Write the trained entries into the weight (directly, or as the custom op under compile)."""
    with torch.no_grad():
        if torch.compiler.is_compiling():
            write_trained_(weight, index, trained, axis)
        else:
            _write_trained(weight, index, trained, axis)


def run_partial_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, trained: Tensor, index: Tensor, axis: int
):
    """x W^T + b with gradients for the trained columns/rows only (eager Function or custom op)."""
    keep = trained.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        return partial_linear(x, weight, bias, trained, index, axis, keep)[0]
    return _PartialLinearFn.apply(x, weight, bias, trained, index, axis, keep)


def run_lora_project(x, xa, a, ranks, weights, biases, bs) -> list[Tensor]:
    """The 2-D outputs of projections reading x (xa: dropout(x), or None)."""
    if torch.compiler.is_compiling():
        return list(lora_project(x, xa, a, ranks, list(weights), list(biases), list(bs))[0])
    per_projection = [t for triple in zip(weights, biases, bs, strict=True) for t in triple]
    return list(_ProjectFn.apply(x, xa, a, tuple(ranks), *per_projection))


def run_lora_gated_mlp(x, a_in, a_down, b_down, w_down, bias_down, activation, ranks, weights, biases, bs):
    """The 2-D output of the fused gated MLP."""
    if torch.compiler.is_compiling():
        args = (x, a_in, a_down, b_down, w_down, bias_down, activation, ranks, list(weights), list(biases))
        return lora_gated_mlp(*args, list(bs))[0]
    per_projection = [t for triple in zip(weights, biases, bs, strict=True) for t in triple]
    return _GatedMLPFn.apply(
        x, a_in, a_down, b_down, w_down, bias_down, activation, tuple(ranks), *per_projection
    )
