"""`slimtune.lean(model)`: swap the frozen parts of a decoder step for lean stand-ins.

Composes with every method and with a plain frozen model, before or after `apply`. The
architecture registry says where the RMSNorms, gated MLPs, attention modules (their rotary
embedding) and the LM head are; each swap is accepted only after a numerical probe shows the
stand-in computes what the module computes (skipped, and said, on the meta device). What was
swapped, and what was not and why, is in `lean_report`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops
from .architectures import (
    ROTARY_FUNCTION,
    activation_kind,
    architecture,
    attention_layout,
    final_logit_softcap,
    head_geometry,
    mlp_layout,
    probe_input,
    rms_norm_eps,
    rotary_function,
    rotary_width,
)
from .layers.lean import LeanAttention, LeanGatedMLP, LeanLMHead, LeanRMSNorm, lean_forward
from .layers.partial import PartialLinear
from .transaction import Transaction

_LEAN = "_slimtune_lean"


@dataclass
class LeanState:
    norms: list[str] = field(default_factory=list)
    mlps: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # rotary embeddings as kernels
    lm_head: str | None = None
    hooks: list[Any] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _probe_input(module: nn.Module, width: int) -> torch.Tensor | None:
    return probe_input(next(module.parameters()), 2, 3, width)


# Agreement asked of a stand-in, relative to the largest value: float32 to 1e-5; a 16-bit stand-in's
# kernel rounds once where the module rounds twice (act(gate) before the product), so a few units
# in the last place of the dtype. A different function misses by far more.
PROBE_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    tolerance = PROBE_TOLERANCE.get(b.dtype, 1e-5)
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) <= tolerance)


@torch.no_grad()
def _lean_norm(module: nn.Module, eps: float) -> tuple[LeanRMSNorm | None, str]:
    x = _probe_input(module, module.weight.shape[0])
    for flavor in ("llama", "gemma"):
        lean = LeanRMSNorm(module, eps, flavor)
        if x is None:  # meta: take the family's flavor by name
            gemma = "Gemma" in type(module).__name__
            return LeanRMSNorm(module, eps, "gemma" if gemma else "llama"), ""
        if _same(lean(x), module(x)):
            return lean, ""
    return None, f"{type(module).__name__}: no lean RMSNorm flavor matches its forward on a probe input"


@torch.no_grad()
def _lean_mlp(module: nn.Module, arch) -> tuple[LeanGatedMLP | None, str]:
    layout = mlp_layout(module, arch)
    children = [module._modules[n] for n in (*layout.inputs, layout.down)]
    if not all(type(c) is nn.Linear or isinstance(c, PartialLinear) for c in children):
        return None, f"{type(module).__name__}: projections not plain or partial linears (adapters, 4-bit)"
    activation = next((n for n in layout.activations if isinstance(module._modules.get(n), nn.Module)), None)
    if activation is None:
        return None, f"{type(module).__name__}: no activation module ({' or '.join(layout.activations)})"
    kind = activation_kind(module._modules[activation])
    lean = LeanGatedMLP(module, layout.inputs, layout.down, activation, kind)
    x = _probe_input(module, children[0].in_features)
    if x is not None and not _same(lean(x), module(x)):
        lean.restore()
        return None, f"{type(module).__name__}: its forward does not compute down(act(gate(x)) * up(x))"
    return lean, ""


def lean(model: nn.Module, recompute: float = 0.0) -> nn.Module:
    """Swap the model's RMSNorms, gated MLPs, attention modules' rotary embedding and LM head + loss
    for lean stand-ins, in place.

    Outputs and gradients stay those of the model within dtype tolerance; called with `labels`, the
    model returns its loss and `logits=None` (the batch's logits are never formed). `recompute`: the
    fraction of gated MLPs (evenly spread over the blocks) that keep no up projection output and
    recompute it in backward, one GEMM each (memory for time; separate gate and up projections).
    `unlean` undoes it. All or nothing: a failure part-way leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _LEAN, None) is not None:
        raise ValueError(f"{type(model).__name__} is lean already; call slimtune.unlean(model) first")
    if isinstance(recompute, bool) or not isinstance(recompute, int | float) or not 0 <= recompute <= 1:
        raise ValueError(f"recompute must be a fraction of the gated MLPs in [0, 1], got {recompute!r}")
    state = LeanState()
    with Transaction(model) as transaction:
        swaps = _block_swaps(model, state)
        swaps += _head_swap(model, state, transaction)
        _spread_recompute([r for _, r in swaps if isinstance(r, LeanGatedMLP)], recompute)
        for name, replacement in swaps:
            model.set_submodule(name, replacement)
        setattr(model, _LEAN, state)
    if state.skipped:
        warnings.warn(
            f"slimtune.lean: {len(state.skipped)} modules kept their own path: "
            f"{'; '.join(sorted(set(state.skipped.values())))}",
            stacklevel=2,
        )
    return model


@torch.no_grad()
def _lean_attention(module: nn.Module, model: nn.Module) -> tuple[LeanAttention | None, str]:
    """The attention stand-in if the module's rotary function computes what the rotary kernel does
    (probed in float32 on random q, k and tables of the model's rotary width)."""
    name, rotary = type(module).__name__, rotary_function(type(module))
    if rotary is None:
        return None, f"{name}: its forward calls no {ROTARY_FUNCTION}"
    if lean_forward(type(module)) is None:
        return None, f"{name}: a decorator of its forward cannot be rewired"
    weight = next(module.parameters())
    q = probe_input(weight, 1, 3, 5, head_geometry(model).head_dim)
    if q is not None:
        q = q.float()
        k, cos, sin = q[:, :2] * 0.5, *probe_input(weight, 2, 1, 5, rotary_width(model), seed=1).float()
        expected = rotary(q, k, cos, sin)
        got = (ops.rope_ref(q, cos, sin), ops.rope_ref(k, cos, sin))
        if not all(_same(a, b) for a, b in zip(got, expected, strict=True)):
            return None, f"{name}: its {ROTARY_FUNCTION} is not the rotation of the rotary kernel"
    return LeanAttention(module), ""


def _stand_in(name: str, module: nn.Module, model: nn.Module, arch, state: LeanState):
    """(stand-in or None, why not, the state's list it goes to), or None for a module lean leaves."""
    eps = rms_norm_eps(module)
    if eps is not None:
        return (*_lean_norm(module, eps), state.norms)
    if mlp_layout(module, arch) is not None and type(module).__name__ != "FusedGatedMLP":
        return (*_lean_mlp(module, arch), state.mlps)
    if attention_layout(module, arch) is not None:
        return (*_lean_attention(module, model), state.attention)
    return None


def _spread_recompute(mlps: list[LeanGatedMLP], fraction: float) -> None:
    """Mark round(fraction x len) of the MLPs, evenly spread, to recompute their up projection."""
    count = round(fraction * len(mlps))
    for k, mlp in enumerate(mlps):
        mlp.recompute_up = (k + 1) * count // len(mlps) > k * count // len(mlps)


def _block_swaps(model: nn.Module, state: LeanState) -> list[tuple[str, nn.Module]]:
    """The stand-ins of the blocks' RMSNorms, gated MLPs and attention modules that pass their probes
    (the rest are recorded in `state.skipped` with the reason), parents before their children."""
    arch, swaps = architecture(model), []
    for name, module in model.named_modules():
        found = _stand_in(name, module, model, arch, state) if name else None
        if found is None:
            continue
        replacement, why, swapped = found
        if replacement is None:
            state.skipped[name] = why
        else:
            swaps.append((name, replacement))
            swapped.append(name)
    return swaps


def _head_swap(model: nn.Module, state: LeanState, transaction: Transaction) -> list[tuple[str, nn.Module]]:
    """The LM head's stand-in and its two hooks on the model (removed again if the swap fails)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if type(head) is not nn.Linear or head.bias is not None or not head_name:
        if head is not None:
            state.skipped["lm_head"] = f"{type(head).__name__} with bias or not a plain nn.Linear: kept"
        return []
    state.lm_head = head_name
    lean_head = LeanLMHead(head, final_logit_softcap(model))
    for register, hook in ((model.register_forward_pre_hook, lean_head.divert_labels),
                           (model.register_forward_hook, lean_head.attach_loss)):  # fmt: skip
        state.hooks.append(register(hook, with_kwargs=True))
        transaction.on_rollback(state.hooks[-1].remove)
    return [(head_name, lean_head)]


def unlean(model: nn.Module) -> nn.Module:
    """Put the original modules back (their parameters are the lean stand-ins' own); all or nothing."""
    state: LeanState | None = getattr(model, _LEAN, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not lean; there is nothing to undo")
    with Transaction(model):
        # attention last: a stand-in gives its original the children current then (q/k norms restored)
        for name in [
            *state.norms,
            *state.mlps,
            *([state.lm_head] if state.lm_head else []),
            *state.attention,
        ]:
            module = model.get_submodule(name)
            if isinstance(module, LeanGatedMLP | LeanRMSNorm | LeanLMHead | LeanAttention):
                model.set_submodule(name, module.restore())
            elif isinstance(getattr(module, "original", None), LeanGatedMLP):
                inner = module.original  # LoRA's fused MLP over a lean one
                inner._modules.update(module._modules)  # the fused module's children are the current ones
                module.__dict__["original"] = inner.restore()
        delattr(model, _LEAN)
    for hook in state.hooks:  # last: nothing after it can fail
        hook.remove()
    return model


def lean_report(model: nn.Module) -> dict[str, Any]:
    """Which modules run lean, and which kept their own path (with the reason)."""
    state: LeanState | None = getattr(model, _LEAN, None)
    if state is None:
        return {"lean": False}
    return {
        "lean": True,
        "norms": len(state.norms),
        "attention (rotary kernel)": len(state.attention),
        "gated MLPs": state.mlps,
        "recompute up": [n for n in state.mlps if getattr(model.get_submodule(n), "recompute_up", False)],
        "lm_head": state.lm_head,
        "kept": dict(state.skipped),
    }
