"""Exact accounting of a training step without running it on a card: memory, FLOPs and bytes.

The step (forward with labels, backward, optimizer step, zero_grad) runs on the meta device, so
an 8B or 70B config needs no memory. A dispatch mode sees every op: it adds each new storage's
bytes when the op creates it and subtracts them when the storage dies (a finalizer on the storage,
which PyTorch keeps alive exactly as long as any tensor uses it), which gives the peak of live
bytes as `torch.cuda.max_memory_allocated` counts them, minus the allocator's rounding and
fragmentation and library workspaces. Saved-tensor hooks record what autograd keeps for backward,
deduplicated by storage, with the module that saved it. FLOPs come from torch's flop formulas, bytes
moved from each op's inputs and outputs (views move nothing).

On the meta device `scaled_dot_product_attention` would fall back to its math path and keep the
full attention matrix; a card runs flash attention, which keeps q, k, v, the output and the
log-sum-exp. `FlashAttentionMode` stands in for it with exactly that memory behaviour and the
causal attention FLOPs.
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
from torch.overrides import TorchFunctionMode
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
        module, slimtune.layers.PartialLinear | slimtune.layers.LoRALinear | slimtune.layers.HydraLinear
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
    """Flash attention's memory on any device: keeps q, k, v, out and the float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def attention_flops(q: Tensor, k: Tensor, causal: bool) -> int:
    """Forward FLOPs of softmax(q k^T) v: two GEMMs of B H Tq Tk D, halved when causal."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    flops = 4 * b * h * tq * tk * d
    return flops // 2 if causal and tq == tk else flops


class FlashAttentionMode(TorchFunctionMode):
    """Routes meta-device `scaled_dot_product_attention` to `_FlashAttention`, counting its FLOPs
    (backward: 2.5x the forward, flash attention's recomputation included)."""

    def __init__(self, counter: StepCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].device.type == "meta":
            q, k, v = args[:3]
            fwd = attention_flops(q, k, causal=q.shape[-2] == k.shape[-2])
            self.counter.attention_flops += fwd * (
                3.5 if torch.is_grad_enabled() and q.requires_grad else 1.0
            )
            return _FlashAttention.apply(q, k, v)
        return func(*args, **kwargs)


_VIEW_OPS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand",
             "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.alias", "aten.as_strided",
             "aten.detach", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
             "aten.diagonal",
             "aten.reshape", "aten.unflatten", "aten.flatten", "aten.view_as", "aten.lift_fresh"}  # fmt: skip


@dataclass
class StepCounter:
    """Live bytes (with their peak), FLOPs and bytes moved of what runs inside it."""

    live: int = 0
    peak: int = 0
    matmul_flops: int = 0
    attention_flops: float = 0.0
    bytes_moved: int = 0
    matmul_bytes: int = 0
    fused_depth: int = 0  # > 0 inside one of slimtune's fused kernels
    _sizes: dict[int, int] = field(default_factory=dict)

    def adopt(self, tensors: list[Tensor]) -> None:
        """Count tensors that exist already (weights, buffers) as live."""
        for t in tensors:
            self._track(t)

    def _track(self, t: Tensor) -> bool:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return False
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)
        return True

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: StepCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counter = self.counter
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        new = [counter._track(t) for t in outputs]
        name = str(func.overloadpacket)
        if name not in _VIEW_OPS:
            formula = _flop_formula(func.overloadpacket)
            if formula is not None:
                counter.matmul_flops += formula(*args, **kwargs, out_val=out)
            if counter.fused_depth == 0:  # a fused kernel's traffic is counted once, by `fused_kernels`
                inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
                moved = _nbytes(inputs) + _nbytes([t for t, fresh in zip(outputs, new, strict=True) if fresh])
                counter.bytes_moved += moved
                if formula is not None:
                    counter.matmul_bytes += moved
        return out


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def fused_kernels(counter: StepCounter) -> Iterator[None]:
    """Count each of slimtune's ops whose CUDA default is a native kernel (Triton or CUDA C++) as one
    pass over its inputs and outputs, as that kernel runs on a card, instead of the PyTorch
    reference's ops that run on the meta device; matmul FLOPs inside are still counted. Ops whose
    CUDA default is plain torch code ('blas') are counted op by op like the rest of the model."""
    wrapped = [op for op in slimtune.ops.OPS.values() if op.prefer_cuda[:1] in (("triton",), ("cuda",))]

    def wrap(op):
        run = op.run

        def counted(*args, **kwargs):
            flops = counter.matmul_flops
            counter.fused_depth += 1
            try:
                out = run(*args, **kwargs)
            finally:
                counter.fused_depth -= 1
            if counter.fused_depth == 0:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, Tensor)]
                moved = _nbytes(tensors)
                counter.bytes_moved += moved
                if counter.matmul_flops > flops:
                    counter.matmul_bytes += moved
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
def record_saved(model: nn.Module, saved: SavedTensors, exclude: set[int]) -> Iterator[None]:
    """Saved-tensor hooks attributing each saved storage to the innermost running module's kind."""
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

    weights: int  # frozen parameters and buffers
    trainable: int  # trainable parameters (and master copies)
    trainable_count: int
    masters: int  # of `trainable`: float32 trained tensors of a half-precision model (PaCA/S2FT masters,
    # float32 adapters); they cost the same again as gradients
    gradients: int
    optimizer: int
    saved: dict[str, int]  # tensors saved for backward, by module kind
    peak: int  # the peak of live bytes over the step (weights included)
    forward_flops: float
    backward_flops: float
    bytes_moved: int
    matmul_bytes: int

    @property
    def saved_total(self) -> int:
        return sum(self.saved.values())


def account_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: dict[str, Tensor],
    steps: int = 2,
) -> StepAccount:
    """Run `steps` training steps under the counters and account the last one."""
    counter = StepCounter()
    params = list(model.parameters())
    counter.adopt(params + list(model.buffers()))
    existing = {t.untyped_storage()._cdata for t in params + list(model.buffers())}
    saved = SavedTensors()
    with FlashAttentionMode(counter), _Dispatch(counter), fused_kernels(counter):
        for step in range(steps):
            last = step == steps - 1
            if last:
                counter.reset_peak()
                counter.matmul_flops = 0
                counter.attention_flops = 0.0
                counter.bytes_moved = counter.matmul_bytes = 0
            recorder = record_saved(model, saved, existing) if last else nullcontext()
            with recorder:
                loss = model(**batch).loss
            forward = (counter.matmul_flops, counter.attention_flops)
            loss.backward()
            del loss
            grads = [p.grad for p in params if p.grad is not None]
            gradients = storage_bytes(grads)
            del grads
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
    trainable = [p for p in params if p.requires_grad]
    state = [
        t
        for s in (optimizer.state.values() if optimizer else ())
        for t in s.values()
        if isinstance(t, Tensor)
    ]
    frozen = [p for p in params if not p.requires_grad] + list(model.buffers())
    half = any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    masters = [p for p in trainable if half and p.dtype == torch.float32]
    fwd_flops = forward[0] + forward[1]
    total_flops = counter.matmul_flops + counter.attention_flops
    return StepAccount(
        weights=storage_bytes(frozen),
        trainable=storage_bytes(trainable),
        trainable_count=sum(p.numel() for p in trainable),
        masters=storage_bytes(masters),
        gradients=gradients,
        optimizer=storage_bytes(state),
        saved={kind: saved.by_kind.get(kind, 0) for kind in KINDS},
        peak=counter.peak,
        forward_flops=float(fwd_flops),
        backward_flops=float(total_flops - fwd_flops),
        bytes_moved=counter.bytes_moved,
        matmul_bytes=counter.matmul_bytes,
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


def modelled_ms(account: StepAccount, card: Card, dtype: torch.dtype) -> float:
    """Roofline model, not a measurement: matmuls at the card's peak FLOP rate, every other op at its
    peak bandwidth (each op reading its inputs and writing its outputs once)."""
    peak = card.tflops_16bit if dtype in (torch.bfloat16, torch.float16) else card.tflops_32bit
    compute = (account.forward_flops + account.backward_flops) / (peak * 1e12)
    memory = (account.bytes_moved - account.matmul_bytes) / (card.tb_per_s * 1e12)
    return (compute + memory) * 1e3
