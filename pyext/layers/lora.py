"""LoRA and Hydra layers: a frozen linear whose low-rank adapter is computed inside its own GEMM.

The autograd functions see every adapter as one pair (a, b) in the compute dtype, so that
y = x W^T + bias + (x a^T) b^T:

- LoRA: a = A, b = (alpha / r) B.
- Hydra: a = [Ap; As W0], b = [sp Bp, ss Bs]. The sequential branch Bs As (W0 x) is reassociated as
  Bs (As W0) x: its down-projection is applied to the weight once per step (rs x out x in FLOPs),
  not to the base output per token, so it rides the same fused kernels as the parallel branch.

(a, b) are built from the trained parameters outside the autograd functions, so autograd carries
their gradients back through the scaling, the float32-master cast and As W0.

Saved for backward: the adapter input x (the frozen base product needs no saved activation; x is
needed for dA only) and u = x a^T (N x r, for dB). Siblings reading one x (q/k/v, gate/up) share one
x, one u, one down-projection GEMM and one input-gradient GEMM. The gated MLP also keeps gate, up
and the down adapter's u; h = act(gate) * up is recomputed in backward.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import library
from ..architectures import GatedMLPSpec
from .precision import autocast_dtype, autocast_off
from .standin import StandIn


def _compute_dtype(x: Tensor, layer: AdapterLinear) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """The dtype the products run in, and a context with autocast off inside (inputs are cast up front,
    and every product must keep the dtype it is given). Outside autocast an input of another dtype
    than the layer's weight is refused, as nn.Linear refuses it."""
    device = x.device.type
    dtype = autocast_dtype(device)
    if dtype is not None:
        return dtype, autocast_off(device)
    if x.dtype != layer.weight.dtype:
        raise RuntimeError(
            f"expected the input of a {type(layer).__name__} to have dtype {layer.weight.dtype} (its "
            f"weight's), got {x.dtype}: cast the input, or run under torch.autocast"
        )
    return x.dtype, contextlib.nullcontext()


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _adapter_args(
    layers: Sequence[AdapterLinear], dtype: torch.dtype
) -> tuple[Tensor, tuple[int, ...], list]:
    """The concatenated down-projections, the ranks, and (weight, bias, b) per layer, in `dtype`."""
    pairs = [layer.adapter(dtype) for layer in layers]
    a = torch.cat([a for a, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
    per_layer = [
        t
        for layer, (_, b) in zip(layers, pairs, strict=True)
        for t in (_cast(layer.weight, dtype), _cast(layer.bias, dtype), b)
    ]
    return a, tuple(a.shape[0] for a, _ in pairs), per_layer


def project(x: Tensor, layers: Sequence[AdapterLinear], dropout: float = 0.0) -> list[Tensor]:
    """The outputs of adapter layers that read the same x (one down-projection GEMM for all)."""
    dtype, no_autocast = _compute_dtype(x, layers[0])
    with no_autocast:
        x = x.to(dtype)
        a, ranks, per_layer = _adapter_args(layers, dtype)
        xa = F.dropout(x, dropout, training=True) if dropout else None
        weights, biases, bs = per_layer[0::3], per_layer[1::3], per_layer[2::3]
        outs = library.run_lora_project(x, xa, a, ranks, weights, biases, bs)
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]


def gated_mlp(x: Tensor, inputs: Sequence[AdapterLinear], down: AdapterLinear, activation: str) -> Tensor:
    """down(act(gate(x)) * up(x)) through one autograd function; `inputs` is [gate, up] or [gate_up]."""
    dtype, no_autocast = _compute_dtype(x, inputs[0])
    with no_autocast:
        x = x.to(dtype)
        a_in, ranks, per_layer = _adapter_args(inputs, dtype)
        a_down, b_down = down.adapter(dtype)
        w_down, bias_down = _cast(down.weight, dtype), _cast(down.bias, dtype)
        weights, biases, bs = per_layer[0::3], per_layer[1::3], per_layer[2::3]
        y = library.run_lora_gated_mlp(
            x, a_in, a_down, b_down, w_down, bias_down, activation, ranks, weights, biases, bs
        )
        return y.view(*x.shape[:-1], y.shape[-1])


def _version(x: Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors keep no version counter


class SharedInput:
    """Sibling projections called one after another on one input (q/k/v; gate/up).

    The first call computes every sibling's output in one pass and keeps the others until their own
    calls with the same tensor. Any other pattern (another input, a repeated call) switches the group
    off for good, with a warning, and each layer then computes alone: never a wrong output.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names, self.layers, self.enabled = list(names), [], True
        self._input: Tensor | None = None
        self._version = -1
        self._pending: dict[AdapterLinear, Tensor] = {}

    def add(self, layer: AdapterLinear) -> None:
        layer.shared = self
        self.layers.append(layer)

    def __call__(self, layer: AdapterLinear, x: Tensor) -> Tensor:
        if self._pending:
            same = x is self._input and _version(x) == self._version
            out = self._pending.pop(layer, None) if same else None
            if out is not None:
                if not self._pending:
                    self._input = None
                return out
            self._disable()
        if not self.enabled:
            return project(x, [layer])[0]
        outs = project(x, self.layers)
        index = self.layers.index(layer)
        self._pending = {
            sib: y for i, (sib, y) in enumerate(zip(self.layers, outs, strict=True)) if i != index
        }
        self._input, self._version = x, _version(x)
        return outs[index]

    def _disable(self) -> None:
        warnings.warn(
            f"slimtune: {self.names} are not called one after another on one input; they now run unfused",
            stacklevel=3,
        )
        self.enabled, self._pending, self._input = False, {}, None


class FusedGatedMLP(StandIn):
    """Stands in for a gated MLP whose projections are adapter layers: one fused autograd op.

    Accepted for a module only after `architectures.probe_gated_mlp` checked its forward.
    """

    def __init__(self, original: nn.Module, spec: GatedMLPSpec) -> None:
        super().__init__(original)
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        inputs = [getattr(self, name) for name in spec.inputs]
        down = getattr(self, spec.down)
        if all(isinstance(m, AdapterLinear) for m in (*inputs, down)):
            return gated_mlp(x, inputs, down, spec.activation)
        return type(self.original).forward(self, x)  # its layers were swapped again: the model's code

    def extra_repr(self) -> str:
        return f"fused {type(self.original).__name__}, activation={self.spec.activation}"


def _bits(t: Tensor) -> Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@dataclass
class MergeRecord:
    """What `unmerge` needs to give the base weight back bit for bit after an in-place merge."""

    tensors: dict[str, Tensor]  # the trained tensors, to rebuild the layer
    b: Tensor  # float64 (out x R) and
    a: Tensor  # float64 (R x in): the merged delta is b @ a
    index: Tensor  # flat positions where round(merged - delta) is not the base value,
    values: Tensor  # and the base values there
    version: int  # the weight's version counter right after merging
    written: bool = False  # whether the merged weight was written (a rollback undoes only then)
    quantized: bool = False  # merged from a 4-bit base into a dense weight: no unmerge back to 4 bits


@torch.no_grad()
def restore_weight_(weight: Tensor, record: MergeRecord) -> None:
    """Undo an in-place merge exactly: round(W' - delta) in float64, then the recorded exceptions."""
    base = (weight.double() - record.b @ record.a).to(weight.dtype)
    base.view(-1)[record.index] = record.values
    weight.copy_(base)


def write_merge_(weight: Tensor, record: MergeRecord, merged: Tensor) -> None:
    """The merge's one write (same dtype and shape: nothing to allocate), then marked as done."""
    weight.detach().copy_(merged)
    record.written = True
    record.version = weight._version


def undo_merge_(weight: Tensor, record: MergeRecord) -> None:
    """A rollback's undo of `write_merge_`: the base weight back if the write happened."""
    if record.written:
        restore_weight_(weight, record)


@torch.no_grad()
def remerge_weight_(weight: Tensor, record: MergeRecord) -> None:
    """Undo `restore_weight_` (a failed `unmerge`): W0 + delta rounded once, as `merge` wrote it."""
    weight.copy_((weight.double() + record.b @ record.a).to(weight.dtype))
    record.version = weight._version


class AdapterLinear(nn.Module):
    """Common part of LoRALinear and HydraLinear: frozen `weight`/`bias` and the fused forward."""

    trained_names: ClassVar[tuple[str, ...]]

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._hold(base)
        self.dropout = 0.0
        self.shared: SharedInput | None = None

    def _hold(self, base: nn.Linear) -> None:
        """Keep the frozen base's weight and bias: the fused products read them."""
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def _adapter_parameter(self, tensor: Tensor, dtype: torch.dtype | None) -> nn.Parameter:
        return nn.Parameter(tensor.to(device=self.weight.device, dtype=dtype or self.weight.dtype))

    def adapter(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(a, b) in `dtype`: the layer adds (x a^T) b^T; differentiable in the trained parameters."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # A compiled graph keeps no Python state between calls: siblings run one by one there.
        if self.shared is not None and self.shared.enabled and not torch.compiler.is_compiling():
            return self.shared(self, x)
        return project(x, [self], self.dropout if self.training else 0.0)[0]

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach() for name in self.trained_names}

    @torch.no_grad()
    def load_trained_(self, tensors: dict[str, Tensor]) -> None:
        for name in self.trained_names:
            getattr(self, name).copy_(tensors[name])

    @torch.no_grad()
    def merge(self) -> tuple[nn.Linear, MergeRecord]:
        """`to_linear()` plus what `restore_weight_` needs to undo it exactly."""
        linear, record, merged = self.prepare_merge()
        write_merge_(linear.weight, record, merged)
        return linear, record

    @torch.no_grad()
    def prepare_merge(self) -> tuple[nn.Linear, MergeRecord, Tensor]:
        """Everything a merge allocates, and nothing written: the plain linear sharing this layer's
        weight and bias, the undo record and the merged weight for `write_merge_`. A caller that must
        undo registers `undo_merge_` between the two, so no failure leaves a weight half merged.
        Without autograd: the record must not hold the trained adapters' graph (nor stop deepcopy)."""
        a, b = self.adapter(torch.float64)
        delta = b @ a
        base = self.weight
        merged = (base.double() + delta).to(base.dtype)
        back = (merged.double() - delta).to(base.dtype)
        index = (_bits(back) != _bits(base)).flatten().nonzero().squeeze(1)
        values = base.flatten()[index]
        record = MergeRecord(self.checkpoint_tensors(), b, a, index, values, version=-1)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear, record, merged

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + delta rounded once (delta in float64), written in place."""
        return self.merge()[0]


def _uniform(shape: tuple[int, int], fan_in: int, generator: torch.Generator | None) -> Tensor:
    """PEFT's default A: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class LoRALinear(AdapterLinear):
    """Drop-in nn.Linear: y = x W^T + b + (alpha / r) (x A^T) B^T.

    Trains lora_A (r x in) and lora_B (out x r); weight and bias stay frozen.
    """

    trained_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base)
        self.r, self.scaling, self.dropout = r, alpha / r, dropout
        self.lora_A = self._adapter_parameter(
            _uniform((r, self.in_features), self.in_features, generator), dtype
        )
        self.lora_B = self._adapter_parameter(torch.zeros(self.out_features, r), dtype)

    def adapter(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.lora_A.to(dtype), (self.lora_B * self.scaling).to(dtype)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, r={self.r}, scaling={self.scaling:g}"


class HydraLinear(AdapterLinear):
    """Drop-in nn.Linear: y = x W0^T + b + sp (x Ap^T) Bp^T + ss ((x W0^T) As^T) Bs^T.

    Trains parallel_A (rp x in), parallel_B (out x rp), sequential_A (rs x out), sequential_B (out x rs).
    """

    trained_names = ("parallel_A", "parallel_B", "sequential_A", "sequential_B")

    def __init__(
        self,
        base: nn.Linear,
        r_parallel: int,
        r_sequential: int,
        alpha: float,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base)
        n_in, n_out = self.in_features, self.out_features
        self.r_parallel, self.r_sequential = r_parallel, r_sequential
        self.scaling_parallel, self.scaling_sequential = alpha / r_parallel, alpha / r_sequential
        self.parallel_A = self._adapter_parameter(_uniform((r_parallel, n_in), n_in, generator), dtype)
        self.parallel_B = self._adapter_parameter(torch.zeros(n_out, r_parallel), dtype)
        self.sequential_A = self._adapter_parameter(_uniform((r_sequential, n_out), n_out, generator), dtype)
        self.sequential_B = self._adapter_parameter(torch.zeros(n_out, r_sequential), dtype)

    def adapter(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        a = torch.cat([self.parallel_A.to(dtype), self.sequential_A.to(dtype) @ self.weight.to(dtype)])
        b = torch.cat(
            [self.parallel_B * self.scaling_parallel, self.sequential_B * self.scaling_sequential], dim=1
        )
        return a, b.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r_parallel={self.r_parallel}, r_sequential={self.r_sequential}"
        )
