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

from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops

COLUMNS, ROWS = 1, 0


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


# ---- kernels ------------------------------------------------------------------------------------


@torch.library.custom_op("slimtune::gather_columns", mutates_args=())
def gather_columns(x: Tensor, index: Tensor) -> Tensor:
    """out[n, j] = x[n, index[j]] (contiguous N x r)."""
    return ops.gather_columns.run(x, index)


@gather_columns.register_fake
def _(x: Tensor, index: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], index.shape[0])


@torch.library.custom_op("slimtune::write_trained_", mutates_args=("weight",))
def write_trained_(weight: Tensor, index: Tensor, trained: Tensor, axis: int) -> None:
    """weight[:, index] = trained (columns, axis 1) or weight[index, :] = trained (rows, axis 0)."""
    if axis == COLUMNS:
        ops.scatter_columns.run(weight, index, trained)
    else:
        ops.scatter_columns.run(weight.t(), index, trained.t())


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
    """One AdamW step of `cols` (float32 math and moments), fused with weight[:, index] = cols."""
    ops.partial_adamw.run(
        cols,
        grad,
        exp_avg,
        exp_avg_sq,
        weight,
        index,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )


@partial_adamw_.register_fake
def _(cols, grad, exp_avg, exp_avg_sq, weight, index, step, lr, beta1, beta2, eps, weight_decay, maximize):
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


@torch.library.custom_op("slimtune::glu_backward", mutates_args=())
def glu_backward(dh: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """([dgate | dup] as one N x 2I tensor, recomputed h): dgate = dh up act'(gate), dup = dh act(gate)."""
    n, i = gate.shape
    packed = torch.empty(n, 2 * i, dtype=gate.dtype, device=gate.device)
    dgate, dup = packed.chunk(2, dim=1)
    h = ops.glu_backward.run(dh, gate, up, activation, dgate, dup)
    return packed, h


@glu_backward.register_fake
def _(dh: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape[0], 2 * gate.shape[1]), gate.new_empty(gate.shape)


# ---- PaCA / S2FT: the partial linear ------------------------------------------------------------


@torch.library.custom_op("slimtune::partial_linear", mutates_args=())
def partial_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, trained: Tensor, index: Tensor, axis: int, keep: bool
) -> tuple[Tensor, Tensor]:
    """(x W^T + b, x[..., index] as N x r when `keep` and axis is columns, else an empty tensor).

    `trained` is an input only for autograd: the weight already holds its values (see
    `PartialLinear.sync_`), so the forward is one dense GEMM.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    if keep and axis == COLUMNS:
        return y, ops.gather_columns.run(_rows(x), index).to(y.dtype)
    return y, x.new_empty(0, dtype=y.dtype)


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
    kept = output[1] if axis == COLUMNS else x
    ctx.save_for_backward(kept, index)
    ctx.weight = weight  # by reference: a later sync writes its trained entries in place


def _partial_linear_backward(ctx, dy: Tensor, _dkept: Tensor | None):
    kept, index = ctx.saved_tensors
    grad_x = grad_trained = None
    if ctx.needs_input_grad[0]:
        grad_x = dy.matmul(ctx.weight.to(dy.dtype)).reshape(ctx.x_shape)
    if ctx.needs_input_grad[3]:
        dy2 = _rows(dy)
        if ctx.axis == COLUMNS:
            grad_trained = column_grad(dy2, kept.to(dy.dtype), None, ctx.trained_dtype)
        else:
            grad_trained = column_grad(_rows(kept).to(dy.dtype), dy2, index, ctx.trained_dtype).t()
    return grad_x, None, None, grad_trained, None, None, None


partial_linear.register_autograd(_partial_linear_backward, setup_context=_partial_linear_setup)


# ---- LoRA / Hydra: projections sharing one input, and the gated MLP ----------------------------


def _no_grads(biases: list[Tensor | None]) -> list[None] | None:
    """The frozen biases' gradient, shaped as torch.library expects: a list only if none is None."""
    return None if any(b is None for b in biases) else [None] * len(biases)


def _project(x2, xa2, a, weights, biases, bs, ranks) -> tuple[list[Tensor], Tensor]:
    u = xa2 @ a.t()
    outs, start = [], 0
    for weight, bias, b, r in zip(weights, biases, bs, ranks, strict=True):
        outs.append(lora_linear(x2, weight, bias, u[:, start : start + r], b))
        start += r
    return outs, u


def _project_backward(dys, xa, u, a, weights, bs, ranks, shares_input: bool, need_x: bool):
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
        dx = lora_input_grad(g, a, list(dys), list(weights)) if need_x else None
    else:
        dx = sum(dy @ w for dy, w in zip(dys, weights, strict=True)) if need_x else None
        dxa = g @ a
    return dx, dxa, da, dbs


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
    x2 = _rows(x)
    xa2 = x2 if xa is None else _rows(xa)
    outs, u = _project(x2, xa2, a, weights, biases, bs, ranks)
    return outs, u  # 2-D: callers reshape (a view made inside an op could not be modified in place)


@lora_project.register_fake
def _(x, xa, a, ranks, weights, biases, bs):
    outs = [x.new_empty(x.numel() // x.shape[-1], w.shape[0]) for w in weights]
    return outs, x.new_empty(x.numel() // x.shape[-1], a.shape[0])


def _lora_project_setup(ctx, inputs, output) -> None:
    x, xa, a, ranks, weights, biases, bs = inputs
    ctx.ranks, ctx.shares_input, ctx.x_shape, ctx.count = tuple(ranks), xa is None, x.shape, len(ranks)
    ctx.no_bias_grads = _no_grads(biases)
    ctx.save_for_backward(x if xa is None else xa, output[1], a, *weights, *bs)


def _lora_project_backward(ctx, d_outs: list[Tensor], _du: Tensor | None):
    xa, u, a, *rest = ctx.saved_tensors
    weights, bs = rest[: ctx.count], rest[ctx.count :]
    dx, dxa, da, dbs = _project_backward(
        [_rows(dy) for dy in d_outs],
        _rows(xa),
        u,
        a,
        weights,
        bs,
        ctx.ranks,
        ctx.shares_input,
        ctx.needs_input_grad[0],
    )
    dx = None if dx is None else dx.reshape(ctx.x_shape)
    dxa = None if dxa is None else dxa.reshape(ctx.x_shape)
    nothing = [None] * ctx.count
    return dx, dxa, da, None, nothing, ctx.no_bias_grads, dbs


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
    """(down(act(gate(x)) * up(x)) with every adapter fused, and what backward keeps: the gate/up
    outputs (one packed gate_up output for Phi-3), u of the inputs' adapters, u of the down adapter).
    h = act(gate) * up is recomputed in backward instead of being kept."""
    x2 = _rows(x)
    outs, u = _project(x2, x2, a_in, weights, biases, bs, ranks)
    gate, up = outs[0].chunk(2, dim=-1) if len(outs) == 1 else outs  # gate_up_proj: gate first
    h, u_down = glu_down(gate, up, a_down, activation)
    y = lora_linear(h, w_down, bias_down, u_down, b_down)
    return y, outs, u, u_down  # y is 2-D: callers reshape


@lora_gated_mlp.register_fake
def _(x, a_in, a_down, b_down, w_down, bias_down, activation, ranks, weights, biases, bs):
    n = x.numel() // x.shape[-1]
    outs = [x.new_empty(n, w.shape[0]) for w in weights]
    y = x.new_empty(n, w_down.shape[0])
    return y, outs, x.new_empty(n, a_in.shape[0]), x.new_empty(n, a_down.shape[0])


def _gated_mlp_setup(ctx, inputs, output) -> None:
    x, a_in, a_down, b_down, w_down, _, activation, ranks, weights, biases, bs = inputs
    ctx.no_bias_grads = _no_grads(biases)
    _, outs, u, u_down = output
    ctx.ranks, ctx.activation, ctx.x_shape, ctx.count = tuple(ranks), activation, x.shape, len(ranks)
    ctx.save_for_backward(x, u, a_in, a_down, b_down, w_down, u_down, *outs, *weights, *bs)


def _gated_mlp_backward(ctx, dy: Tensor, *_unused):
    x, u, a_in, a_down, b_down, w_down, u_down, *rest = ctx.saved_tensors
    count = ctx.count
    outs, weights, bs = rest[:count], rest[count : 2 * count], rest[2 * count :]
    gate, up = outs[0].chunk(2, dim=-1) if count == 1 else outs
    dy = _rows(dy)
    g_down = dy @ b_down
    db_down = dy.t() @ u_down
    dh = lora_input_grad(g_down, a_down, [dy], [w_down])
    packed, h = glu_backward(dh, gate, up, ctx.activation)
    d_outs = [packed] if count == 1 else list(packed.chunk(2, dim=1))
    da_down = g_down.t() @ h
    dx, _, da_in, dbs = _project_backward(
        d_outs, _rows(x), u, a_in, weights, bs, ctx.ranks, True, ctx.needs_input_grad[0]
    )
    dx = None if dx is None else dx.reshape(ctx.x_shape)
    nothing = [None] * count
    return dx, da_in, da_down, db_down, None, None, None, None, nothing, ctx.no_bias_grads, dbs


lora_gated_mlp.register_autograd(_gated_mlp_backward, setup_context=_gated_mlp_setup)
