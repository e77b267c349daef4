"""Fused LoRA kernels: several products summed in one pass over the output, and the gated-MLP glue.

``matmul_sum`` computes ``sum_i p_i @ q_i (+ bias)`` with one fp32 accumulator per output tile,
written once. The LoRA forward is ``[(x, W^T), (u, (sB)^T)]`` (the low-rank term is the last
stretch of the base product's reduction, not a second pass over y); the input gradient of q/k/v
is ``[(dq, Wq), (dk, Wk), (dv, Wv), (g, A)]``. ``glu_down`` forms ``h = act(gate) * up`` and the
down adapter's ``u = h @ A^T`` while the row block is in registers; ``glu_backward`` recomputes
``h`` from ``gate`` and ``up`` (the MLP saves no activation) and writes both gate and up gradients;
``glu`` is ``h`` alone (the lean MLP, whose frozen down projection needs nothing else).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import AUTOTUNE, INTERPRET, check_devices, check_matrix

MAX_TERMS = 4
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def _accumulate(
    acc, p_ptr, q_ptr, K, stride_pn, stride_pk, stride_qk, stride_qm, rows, cols,
    PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc += p[rows, :K] @ q[:K, cols]; rows and cols are already wrapped into range."""
    offs_k = tl.arange(0, BLOCK_K)
    p = p_ptr + rows.to(tl.int64)[:, None] * stride_pn + offs_k[None, :] * stride_pk
    q = q_ptr + offs_k[:, None] * stride_qk + cols.to(tl.int64)[None, :] * stride_qm
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        a = tl.load(p, mask=in_k[None, :], other=0.0)
        b = tl.load(q, mask=in_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        p += BLOCK_K * stride_pk
        q += BLOCK_K * stride_qk
    return acc


@triton.jit
def _matmul_sum_kernel(
    out_ptr, bias_ptr, N, M, stride_on, stride_om,
    p0, q0, k0, sp0n, sp0k, sq0k, sq0m,
    p1, q1, k1, sp1n, sp1k, sq1k, sq1m,
    p2, q2, k2, sp2n, sp2k, sq2k, sq2m,
    p3, q3, k3, sp3n, sp3k, sq3k, sq3m,
    TERMS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_N row blocks share each column block of q while it is in L2.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_N * blocks_m
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_m = (pid % per_group) // group_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Out-of-range rows/columns read wrapped (valid) addresses; they are masked at the store.
    rows = offs_n % N
    cols = offs_m % M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = _accumulate(acc, p0, q0, k0, sp0n, sp0k, sq0k, sq0m, rows, cols, PRECISION, BLOCK_K)
    if TERMS > 1:
        acc = _accumulate(acc, p1, q1, k1, sp1n, sp1k, sq1k, sq1m, rows, cols, PRECISION, BLOCK_K)
    if TERMS > 2:
        acc = _accumulate(acc, p2, q2, k2, sp2n, sp2k, sq2k, sq2m, rows, cols, PRECISION, BLOCK_K)
    if TERMS > 3:
        acc = _accumulate(acc, p3, q3, k3, sp3n, sp3k, sq3k, sq3m, rows, cols, PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_m.to(tl.int64)[None, :] * stride_om
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


def _configs() -> list[triton.Config]:
    """Tiles for Hopper-class GPUs in 16-bit (autotuned per shape); one small tile when interpreting,
    one mid-size tile when autotuning is off (SLIMTUNE_TRITON_AUTOTUNE=0)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_M": 32, "BLOCK_K": 16, "GROUP_N": 2}, num_warps=4)]
    if not AUTOTUNE:
        tile = {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 32, "GROUP_N": 8}
        return [triton.Config(tile, num_warps=4, num_stages=3)]
    tiles = [  # (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages)
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),  # float32 (TF32) operands: half the K depth per stage
    ]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k, "GROUP_N": 8}, num_warps=w, num_stages=s)
        for n, m, k, w, s in tiles
    ]


_matmul_sum = triton.autotune(_configs(), key=["N", "M", "k0", "TERMS"])(_matmul_sum_kernel)


def matmul_sum(
    terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return ``sum_i p_i @ q_i (+ bias)`` as an (N, M) tensor, written once, accumulated in fp32.

    ``p_i`` is (N, K_i) and ``q_i`` is (K_i, M), any strides (pass ``W.t()`` for ``x @ W^T``); all
    share one dtype; at most four terms. ``out_dtype`` defaults to that dtype.
    """
    if not 1 <= len(terms) <= MAX_TERMS:
        raise ValueError(f"matmul_sum takes 1 to {MAX_TERMS} (p, q) terms, got {len(terms)}")
    tensors = {}
    for i, (p, q) in enumerate(terms):
        tensors[f"p{i}"], tensors[f"q{i}"] = check_matrix(f"p{i}", p), check_matrix(f"q{i}", q)
        if (
            p.shape[1] != q.shape[0]
            or p.shape[0] != terms[0][0].shape[0]
            or q.shape[1] != terms[0][1].shape[1]
        ):
            raise ValueError(
                f"term {i}: p {tuple(p.shape)} @ q {tuple(q.shape)} does not give the "
                f"({terms[0][0].shape[0]}, {terms[0][1].shape[1]}) output of term 0"
            )
    dtype = terms[0][0].dtype
    if any(t.dtype != dtype for t in tensors.values()):
        raise TypeError(
            f"all operands must share one dtype, got {sorted({str(t.dtype) for t in tensors.values()})}"
        )
    n, m = terms[0][0].shape[0], terms[0][1].shape[1]
    if bias is not None:
        tensors["bias"] = bias = bias.contiguous()  # read with unit stride
        if bias.shape != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
    device = check_devices(**tensors)
    out = torch.empty((n, m), dtype=out_dtype or dtype, device=device)
    if n == 0 or m == 0:
        return out
    args = []
    for p, q in [*terms, *[terms[0]] * (MAX_TERMS - len(terms))]:  # unused slots: never read
        args += [p, q, p.shape[1], p.stride(0), p.stride(1), q.stride(0), q.stride(1)]
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)

    _matmul_sum[grid](
        out, out if bias is None else bias, n, m, out.stride(0), out.stride(1), *args,
        TERMS=len(terms), HAS_BIAS=bias is not None, PRECISION=precision,
    )  # fmt: skip
    return out


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``x @ W^T + bias + u @ b^T`` in one GEMM: u = x @ A^T (N, r), b = scaled B (M, r)."""
    return matmul_sum([(x, weight.t()), (u, b.t())], bias)


def lora_input_grad(
    g: torch.Tensor, a: torch.Tensor, dys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``sum_i dy_i @ W_i + g @ A``: the input gradient of projections sharing one input, written once."""
    return matmul_sum([*zip(dys, weights, strict=True), (g, a)])


# ---- gated MLP ------------------------------------------------------------------------------------


@triton.jit
def _tanh(z):
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32: 0 silu, 1 gelu (tanh approximation), 2 gelu (erf)."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    """d act / d g in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        return 0.5 * (1.0 + tl.erf(g * 0.7071067811865476)) + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)


@triton.jit
def _glu_down_kernel(
    gate_ptr, up_ptr, a_ptr, h_ptr, u_ptr, N, I, R,
    stride_gn, stride_gi, stride_un, stride_ui, stride_ar, stride_ai,
    stride_hn, stride_hi, stride_uun, stride_uur,
    ACT: tl.constexpr, HAS_A: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # One program owns BLOCK_N full rows: h is formed and stored chunk by chunk, and u = h @ A^T
    # accumulates from the same registers, so the down adapter costs no second read of h.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    in_n = offs_n < N
    rows = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask = in_n[:, None] & (offs_i < I)[None, :]
        g = tl.load(gate_ptr + rows[:, None] * stride_gn + offs_i[None, :] * stride_gi, mask=mask, other=0.0)
        v = tl.load(up_ptr + rows[:, None] * stride_un + offs_i[None, :] * stride_ui, mask=mask, other=0.0)
        h = (_act(g.to(tl.float32), ACT) * v.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * stride_hn + offs_i[None, :] * stride_hi, h, mask=mask)
        if HAS_A:
            a_mask = (offs_i < I)[:, None] & (offs_r < R)[None, :]
            a = tl.load(
                a_ptr + offs_i[:, None] * stride_ai + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0
            )
            acc = tl.dot(h, a, acc, input_precision=PRECISION)
    if HAS_A:
        u = u_ptr + rows[:, None] * stride_uun + offs_r[None, :] * stride_uur
        tl.store(u, acc.to(u_ptr.dtype.element_ty), mask=in_n[:, None] & (offs_r < R)[None, :])


@triton.jit
def _glu_backward_kernel(
    dh_ptr, gate_ptr, up_ptr, h_ptr, dgate_ptr, dup_ptr, N, I,
    s_dhn, s_dhi, s_gn, s_gi, s_un, s_ui, s_hn, s_hi, s_dgn, s_dgi, s_dun, s_dui,
    ACT: tl.constexpr, HAS_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    # Each element is read before it is written, by the same program: dgate and dup may be gate and up.
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_n < N)[:, None] & (offs_i < I)[None, :]
    n, i = offs_n[:, None], offs_i[None, :]
    dh = tl.load(dh_ptr + n * s_dhn + i * s_dhi, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + n * s_gn + i * s_gi, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(up_ptr + n * s_un + i * s_ui, mask=mask, other=0.0).to(tl.float32)
    act = _act(g, ACT)
    if HAS_H:
        tl.store(h_ptr + n * s_hn + i * s_hi, (act * v).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(
        dgate_ptr + n * s_dgn + i * s_dgi,
        (dh * v * _act_grad(g, ACT)).to(dgate_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(dup_ptr + n * s_dun + i * s_dui, (dh * act).to(dup_ptr.dtype.element_ty), mask=mask)


def _activation_code(activation: str) -> int:
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}") from None


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_matrix("gate", gate)
    check_matrix("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"gate and up must match, got {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )


def glu_down(
    gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = act(gate) * up`` (N, I) and the down adapter's ``u = h @ a^T`` (N, r) in one pass."""
    _check_pair(gate, up)
    check_matrix("a", a)
    check_devices(gate=gate, up=up, a=a)
    code = _activation_code(activation)
    if a.shape[1] != gate.shape[1] or a.dtype != gate.dtype:
        raise ValueError(f"a must be (r, {gate.shape[1]}) of {gate.dtype}, got {tuple(a.shape)} of {a.dtype}")
    n, i = gate.shape
    r = a.shape[0]
    h = torch.empty((n, i), dtype=gate.dtype, device=gate.device)
    fused = r <= 128  # the (BLOCK_N, r) fp32 accumulator stays in registers
    u = torch.empty((n, r), dtype=gate.dtype, device=gate.device) if fused else None
    if n and i:
        block_r = max(16, triton.next_power_of_2(r))
        block_n, block_i = (16, 16) if INTERPRET else (64, 64 if block_r <= 64 else 32)
        precision = (
            "tf32" if gate.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
        )
        _glu_down_kernel[(triton.cdiv(n, block_n),)](
            gate, up, a, h, h if u is None else u, n, i, r,
            gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), a.stride(0), a.stride(1),
            h.stride(0), h.stride(1), 0 if u is None else u.stride(0), 0 if u is None else u.stride(1),
            ACT=code, HAS_A=fused, PRECISION=precision, BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_R=block_r,
        )  # fmt: skip
    elif fused:
        u.zero_()
    return h, (u if fused else h @ a.t())


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``h = act(gate) * up`` (N, I) in gate's dtype: the gated MLP's product when no adapter reads h
    (the lean MLP's forward)."""
    _check_pair(gate, up)
    check_devices(gate=gate, up=up)
    code = _activation_code(activation)
    n, i = gate.shape
    h = torch.empty((n, i), dtype=gate.dtype, device=gate.device)
    if n and i:
        block_n, block_i = (16, 16) if INTERPRET else (32, 128)
        _glu_down_kernel[(triton.cdiv(n, block_n),)](
            gate, up, h, h, h, n, i, 0,
            gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), 0, 0, h.stride(0), h.stride(1), 0, 0,
            ACT=code, HAS_A=False, PRECISION="ieee", BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_R=16,
        )  # fmt: skip
    return h


def glu_backward(
    dh: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    dgate: torch.Tensor,
    dup: torch.Tensor,
    need_h: bool = True,
) -> torch.Tensor | None:
    """Write ``dgate = dh * up * act'(gate)`` and ``dup = dh * act(gate)``; return the recomputed h
    (None unless ``need_h``). ``dgate`` and ``dup`` may be ``gate`` and ``up`` themselves (in place)."""
    _check_pair(gate, up)
    for name, t in (("dh", dh), ("dgate", dgate), ("dup", dup)):
        check_matrix(name, t)
        if t.shape != gate.shape:
            raise ValueError(f"{name} must have shape {tuple(gate.shape)}, got {tuple(t.shape)}")
    check_devices(dh=dh, gate=gate, up=up, dgate=dgate, dup=dup)
    code = _activation_code(activation)
    n, i = gate.shape
    h = torch.empty((n, i), dtype=gate.dtype, device=gate.device) if need_h else None
    if n and i:
        block_n, block_i = (16, 32) if INTERPRET else (32, 128)
        grid = (triton.cdiv(n, block_n), triton.cdiv(i, block_i))
        out = gate if h is None else h
        _glu_backward_kernel[grid](
            dh, gate, up, out, dgate, dup, n, i,
            dh.stride(0), dh.stride(1), gate.stride(0), gate.stride(1), up.stride(0), up.stride(1),
            out.stride(0), out.stride(1), dgate.stride(0), dgate.stride(1), dup.stride(0), dup.stride(1),
            ACT=code, HAS_H=need_h, BLOCK_N=block_n, BLOCK_I=block_i,
        )  # fmt: skip
    return h
