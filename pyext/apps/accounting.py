"""Exact accounting of a training step without running it on a card: memory, FLOPs and bytes.

The step (forward with labels, backward, optimizer step, zero_grad) runs on the meta device, so
an 8B or 70B config needs no memory. A dispatch mode sees every op: it adds each new storage's
bytes when the op creates it and subtracts them when the storage dies (a finalizer on the storage,
which PyTorch keeps alive exactly as long as any tensor uses it), which gives the peak of live
bytes as `torch.cuda.max_memory_allocated` counts them, minus the allocator's rounding and
fragmentation and library workspaces. Saved-tensor hooks record what autograd keeps for backward,
deduplicated by storage, with the module that saved it. FLOPs come from torch's flop formulas, bytes
moved from each op's inputs and outputs (views move nothing), both per kernel, for a roofline model
that bounds each kernel by the slower of the two.

On the meta device `scaled_dot_product_attention` would fall back to its math path and keep the
full attention matrix; a card runs flash attention, which keeps q, k, v, the output and the
log-sum-exp. `flash_attention` stands in for it with exactly that memory behaviour and the causal
attention FLOPs, also where gradient checkpointing recomputes the forward inside backward.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import slimtune
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

KINDS = (
    "attention",
    "mlp",
    "norms",
    "embeddings",
    "lm head and loss",
    "adapters and trained entries",
    "other",
)


def module_kind(name: str, module: nn.Module) -> str:
    """Which part of the model a module belongs to, for the memory breakdown."""
    if isinstance(
        module,
        slimtune.layers.PartialLinear
        | slimtune.layers.QPaCALinear
        | slimtune.layers.LoRALinear
        | slimtune.layers.HydraLinear,
    ):
        return "adapters and trained entries"
    if "norm" in type(module).__name__.lower():
        return "norms"
    leaf = name.rsplit(".", 1)[-1]
    if "embed" in leaf or "rotary" in leaf:
        return "embeddings"
    if leaf == "lm_head" or name == "" or type(module).__name__.endswith("ForCausalLM"):
        return "lm head and loss"  # the causal LM's own forward computes the loss
    if any(s in name for s in ("attn", "attention")):
        return "attention"
    if any(s in name for s in ("mlp", "feed_forward", "ffn")):
        return "mlp"
    return "other"


class _FlashAttention(torch.autograd.Function):
    """Flash attention's memory on any device: keeps q, k, v, out and the float32 log-sum-exp; its
    backward counts 2.5x the forward FLOPs (flash attention recomputes the scores)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, counter: StepCounter, flops: int) -> Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.counter, ctx.flops = counter, flops
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, _, _ = ctx.saved_tensors
        # reads q, k, v, out, dout (and the log-sum-exp), writes dq, dk, dv
        moved = 2 * _nbytes([q, k, v]) + 2 * _nbytes([grad])
        ctx.counter.kernel(2.5 * ctx.flops, moved, [q])
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None


def attention_flops(q: Tensor, k: Tensor, causal: bool) -> int:
    """Forward FLOPs of softmax(q k^T) v: two GEMMs of B H Tq Tk D, halved when causal."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    flops = 4 * b * h * tq * tk * d
    return flops // 2 if causal and tq == tk else flops


@contextmanager
def flash_attention(counter: StepCounter) -> Iterator[None]:
    """Meta-device `scaled_dot_product_attention` as flash attention (`_FlashAttention`), counting its
    FLOPs. A patch of the function itself rather than a torch-function mode: gradient checkpointing
    recomputes the forward inside backward, where such a mode is not active."""
    original = F.scaled_dot_product_attention

    def sdpa(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
        if query.device.type != "meta":
            return original(query, key, value, *args, **kwargs)
        flops = attention_flops(query, key, causal=query.shape[-2] == key.shape[-2])
        counter.kernel(flops, _nbytes([query, key, value, query]), [query])  # reads q, k, v; writes out
        return _FlashAttention.apply(query, key, value, counter, flops)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


_VIEW_OPS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand",
             "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.alias", "aten.as_strided",
             "aten.detach", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
             "aten.diagonal",
             "aten.reshape", "aten.unflatten", "aten.flatten", "aten.view_as", "aten.lift_fresh"}  # fmt: skip


Work = dict[tuple[bool, int, int], int]  # (16-bit, FLOPs, bytes moved) of one kernel -> how many ran


PARTS = ("weights", "batch", "optimizer state", "gradients", "saved for backward", "temporaries")


@dataclass
class StepCounter:
    """Live bytes (with their peak and what they were at the peak), and the work of every kernel
    that runs inside it: FLOPs and bytes moved per kernel, so that a roofline model can bound each
    kernel by the slower of the two.

    Every live storage belongs to one of `PARTS`: new ones are temporaries until the step shows them
    to be kept for backward (`reclassify` from the saved-tensor hook) or to be a parameter's gradient
    (from the accumulate-grad hook); weights, the batch and optimizer state exist before the step."""

    live: int = 0
    peak: int = 0
    parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    peak_parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    flops: float = 0.0
    bytes_moved: int = 0
    work: Work = field(default_factory=lambda: defaultdict(int))
    fused_depth: int = 0  # > 0 inside one of slimtune's fused kernels
    card: bool = True  # the step stands for a card's (else a CPU's: the references' temporaries are real)
    fused_flops: int = 0  # FLOPs of the ops inside the running fused kernel
    _sizes: dict[int, tuple[int, str]] = field(default_factory=dict)

    def adopt(self, tensors: list[Tensor], part: str) -> None:
        """Count tensors that exist already as live, and as `part`."""
        for t in tensors:
            self._track(t)
            self.reclassify(t, part)

    def reclassify(self, t: Tensor, part: str, only_from: str | None = None) -> None:
        key = t.untyped_storage()._cdata
        if key not in self._sizes:
            return
        size, old = self._sizes[key]
        if only_from is None or old == only_from:
            self._sizes[key] = (size, part)
            self.parts[old] -= size
            self.parts[part] += size

    def kernel(self, flops: float, moved: int, tensors: list[Tensor]) -> None:
        """One kernel's work; 16-bit when any of its floating-point tensors is."""
        half = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
        self.flops += flops
        self.bytes_moved += moved
        self.work[(half, int(flops), moved)] += 1

    def restart(self) -> None:
        """Forget the work so far and count the peak from the live bytes now."""
        self.peak = self.live
        self.peak_parts = dict(self.parts)
        self.flops, self.bytes_moved = 0.0, 0
        self.work = defaultdict(int)

    def _track(self, t: Tensor) -> bool:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return False
        size = storage.nbytes()
        self._sizes[key] = (size, "temporaries")
        self.parts["temporaries"] += size
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
            self.peak_parts = dict(self.parts)
        weakref.finalize(storage, self._free, key)
        return True

    def _free(self, key: int) -> None:
        size, part = self._sizes.pop(key, (0, "temporaries"))
        self.live -= size
        self.parts[part] -= size


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: StepCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return _meta_truth(args[0])
        out = func(*args, **kwargs)
        counter = self.counter
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        in_kernel = counter.fused_depth > 0
        # Inside one of slimtune's kernels on a card its reference's ops stand for work in registers:
        # their FLOPs count, their temporaries do not (its outputs are tracked by `fused_kernels`).
        new = [] if in_kernel and counter.card else [counter._track(t) for t in outputs]
        if str(func.overloadpacket) in _VIEW_OPS:
            return out
        formula = _flop_formula(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        if in_kernel:  # a fused kernel's traffic is counted once, by `fused_kernels`
            counter.fused_flops += flops
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        written = [t for t, fresh in zip(outputs, new, strict=True) if fresh]
        counter.kernel(flops, _nbytes(inputs) + _nbytes(written), inputs + outputs)
        return out


def _meta_truth(t: Tensor) -> bool:
    """`bool(t)` for a meta tensor: the model code's checks for packed sequences or padding
    (`(mask == 1).all()`), which hold for the accounting's unpadded batch of one sequence per row.
    Any other scalar read has no answer without data and is refused by name."""
    if t.dtype != torch.bool:
        raise RuntimeError(
            f"the accounting runs on the meta device and cannot read a {t.dtype} scalar "
            "(a data-dependent size or branch in the model's code)"
        )
    return True


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def fused_kernels(counter: StepCounter) -> Iterator[None]:
    """Count each of slimtune's ops whose CUDA default is a native kernel (Triton or CUDA C++) as one
    kernel: one pass over its inputs and outputs with the FLOPs of the ops inside, as it runs on a
    card, instead of the PyTorch reference's ops that run on the meta device; of its memory, only
    its outputs (the reference's float32 temporaries are the kernel's registers). Ops whose CUDA
    default is plain torch code ('blas') are counted op by op like the rest of the model."""
    wrapped = [op for op in slimtune.ops.OPS.values() if op.prefer_cuda[:1] in (("triton",), ("cuda",))]

    def wrap(op):
        run = op.run

        def counted(*args, **kwargs):
            outer = counter.fused_depth == 0
            if outer:
                counter.fused_flops = 0
            counter.fused_depth += 1
            try:
                out = run(*args, **kwargs)
            finally:
                counter.fused_depth -= 1
            if outer:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, Tensor)]
                for t in tree_flatten(out)[0]:
                    if isinstance(t, Tensor):
                        counter._track(t)  # the kernel's outputs (new ones count from here)
                counter.kernel(counter.fused_flops, _nbytes(tensors), tensors)
            return out

        return counted

    for op in wrapped:
        op.run = wrap(op)
    try:
        yield
    finally:
        for op in wrapped:
            del op.run  # the class's method again


def _flop_formula(packet) -> Callable[..., int] | None:
    """torch's flop formula of an op, or of its out-of-place form for an in-place one (addmm_)."""
    if packet in flop_registry:
        return flop_registry[packet]
    name = packet.__name__
    if name.endswith("_"):
        base = getattr(torch.ops.aten, name[:-1], None)
        return flop_registry.get(base)
    return None


@dataclass
class SavedTensors:
    """What autograd keeps for backward, by module kind, deduplicated by storage (parameters and
    buffers, which exist anyway, excluded)."""

    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _seen: set[int] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


@contextmanager
def record_saved(
    model: nn.Module, saved: SavedTensors, exclude: set[int], counter: StepCounter | None = None
) -> Iterator[None]:
    """Saved-tensor hooks attributing each saved storage to the innermost running module's kind (and
    the counter's temporaries it keeps to the part saved for backward)."""
    stack: list[str] = ["lm head and loss"]
    kinds = {id(m): module_kind(n, m) for n, m in model.named_modules()}
    handles = []

    def enter(kind: str) -> Callable[..., None]:
        def hook(*_) -> None:
            stack.append(kind)

        return hook

    def leave(*_) -> None:  # returns None: a forward hook's return value would replace the output
        stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter(kinds[id(m)])))
        handles.append(m.register_forward_hook(leave))

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if counter is not None:
            counter.reclassify(t, "saved for backward", only_from="temporaries")
        if key not in saved._seen and key not in exclude:
            saved._seen.add(key)
            saved.by_kind[stack[-1]] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for handle in handles:
            handle.remove()


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass
class StepAccount:
    """Exact bytes and work of one training step (the second one, so optimizer state exists)."""

    weights: int  # every parameter and buffer of the model, trained or frozen
    trainable: int  # of `weights`: the trained parameters (and master copies)
    trainable_count: int
    masters: int  # of `trainable`: float32 trained tensors of a half-precision model (PaCA/S2FT masters,
    # float32 adapters); they cost the same again as gradients
    gradients: int
    optimizer: int
    saved: dict[str, int]  # tensors saved for backward, by module kind
    peak: int  # the peak of live bytes over the step (weights and the batch included)
    peak_parts: dict[str, int]  # what was live at the peak, by `PARTS` (sums to `peak`)
    forward_flops: float
    backward_flops: float
    bytes_moved: int
    work: Work  # every kernel's FLOPs and bytes (see StepCounter)

    @property
    def saved_total(self) -> int:
        return sum(self.saved.values())


def model_tensors(model: nn.Module) -> list[Tensor]:
    """Every tensor the model holds: parameters, buffers, and the quantization state of 4-bit bases
    (bitsandbytes keeps it beside the parameter)."""
    return [*model.parameters(), *model.buffers(), *slimtune.quantized.held_tensors(model)]


def optimizer_state(optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    states = optimizer.state.values() if optimizer is not None else ()
    return [t for s in states for t in s.values() if isinstance(t, Tensor)]


@contextmanager
def _gradients_counted(params: list[nn.Parameter], counter: StepCounter) -> Iterator[None]:
    """Each parameter's gradient counted as the gradients part once it is accumulated."""
    handles = [
        p.register_post_accumulate_grad_hook(lambda p: counter.reclassify(p.grad, "gradients"))
        for p in params
        if p.requires_grad
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict[str, Tensor],
                counter: StepCounter, recorder) -> tuple[float, int]:  # fmt: skip
    """One step; returns its forward FLOPs and the bytes of the gradients it made."""
    with recorder:
        loss = model(**batch).loss
    forward_flops = counter.flops
    loss.backward()
    del loss
    gradients = storage_bytes([p.grad for p in model.parameters() if p.grad is not None])
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    return forward_flops, gradients


def account_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: dict[str, Tensor],
    steps: int = 2,
    models: str = "cuda",
) -> StepAccount:
    """Run `steps` training steps under the counters and account the last one, as the program of
    `models` ("cuda": a card's, slimtune's kernels included; "cpu": the references' as a CPU runs them)."""
    counter = StepCounter(card=models == "cuda")
    params = list(model.parameters())
    weights = model_tensors(model)
    counter.adopt(weights, "weights")
    counter.adopt(list(batch.values()), "batch")
    existing = {t.untyped_storage()._cdata for t in weights}
    saved = SavedTensors()
    with (
        slimtune.ops.meta_models(models),
        flash_attention(counter),
        _Dispatch(counter),
        fused_kernels(counter),
        _gradients_counted(params, counter),
    ):
        for _ in range(steps - 1):
            _train_step(model, optimizer, batch, counter, nullcontext())
        counter.adopt(optimizer_state(optimizer), "optimizer state")
        counter.restart()
        forward_flops, gradients = _train_step(
            model, optimizer, batch, counter, record_saved(model, saved, existing, counter)
        )
    trainable = [p for p in params if p.requires_grad]
    half = any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    return StepAccount(
        weights=storage_bytes(weights),
        trainable=storage_bytes(trainable),
        trainable_count=sum(p.numel() for p in trainable),
        masters=storage_bytes([p for p in trainable if half and p.dtype == torch.float32]),
        gradients=gradients,
        optimizer=storage_bytes(optimizer_state(optimizer)),
        saved={kind: saved.by_kind.get(kind, 0) for kind in KINDS},
        peak=counter.peak,
        peak_parts=dict(counter.peak_parts),
        forward_flops=forward_flops,
        backward_flops=counter.flops - forward_flops,
        bytes_moved=counter.bytes_moved,
        work=dict(counter.work),
    )


@dataclass(frozen=True)
class Card:
    """Published dense peaks of a card (vendor datasheets, SXM parts), for the roofline model."""

    name: str
    tflops_16bit: float  # bf16/fp16 tensor-core dense
    tflops_32bit: float  # fp32 (non tensor core)
    tb_per_s: float  # HBM bandwidth
    memory_gib: float


CARDS = {
    "a100": Card("A100 80GB SXM", 312.0, 19.5, 2.04, 80.0),
    "h100": Card("H100 SXM", 989.0, 67.0, 3.35, 80.0),
    "h200": Card("H200 SXM", 989.0, 67.0, 4.8, 141.0),
}


def modelled_ms(account: StepAccount, card: Card) -> float:
    """Roofline model, not a measurement: each kernel takes the longer of its FLOPs at the card's peak
    (tensor cores when any of its tensors is 16-bit) and its bytes at the card's bandwidth (reading
    its inputs and writing its outputs once), so a skinny, memory-bound product (PaCA's column
    gradient, LoRA's down-projection) costs its traffic, not its few FLOPs."""
    seconds = 0.0
    for (half, flops, moved), count in account.work.items():
        peak = card.tflops_16bit if half else card.tflops_32bit
        seconds += count * max(flops / (peak * 1e12), moved / (card.tb_per_s * 1e12))
    return seconds * 1e3
