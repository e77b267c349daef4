"""The one module that knows Hugging Face module names and layouts.

Everything else in slimtune asks this module where a model keeps its blocks, projections, gated
MLPs, activations and head geometry. An `Architecture` is keyed by `config.model_type` (the text
config's, for vision-language models), with a generic fallback that tries every known layout; a
layout that no entry describes is refused by the caller with a message naming the module and what
is missing. The coverage table in `docs/architecture.md` is tested by `tests/test_architectures.py`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .ops import GLU_ACTIVATIONS


@dataclass(frozen=True)
class AttentionLayout:
    """Child names of an attention module: separate q/k/v, or one fused qkv (q, then k, then v)."""

    o: str = "o_proj"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)  # type: ignore[return-value]


@dataclass(frozen=True)
class MLPLayout:
    """Child names of a gated MLP, down(act(gate(x)) * up(x)): separate gate/up, or one fused gate_up
    (gate first), and the candidate names of its activation attribute."""

    down: str = "down_proj"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None
    activations: tuple[str, ...] = ("act_fn", "activation_fn")

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.gate_up,) if self.gate_up else (self.gate, self.up)  # type: ignore[return-value]


SEPARATE_QKV = AttentionLayout()
FUSED_QKV = AttentionLayout(q=None, k=None, v=None, qkv="qkv_proj")  # Phi-3
GATED_MLP = MLPLayout()
FUSED_GATE_UP = MLPLayout(gate=None, up=None, gate_up="gate_up_proj")  # Phi-3


@dataclass(frozen=True)
class Architecture:
    """What slimtune knows of one family: its layouts, and the module-name patterns of HFT's categories."""

    name: str
    attention: tuple[AttentionLayout, ...] = (SEPARATE_QKV, FUSED_QKV)
    mlp: tuple[MLPLayout, ...] = (GATED_MLP, FUSED_GATE_UP)
    attention_scope: str = r"attn|attention"
    ffn_scope: str = r"mlp|feed_forward|ffn"
    not_all_linear: str | None = None  # leaf names that "all-linear" leaves out (e.g. MoE routers)
    notes: str = ""


GENERIC = Architecture("generic", notes="every known layout is tried")
_LLAMA_LIKE = dict(attention=(SEPARATE_QKV,), mlp=(GATED_MLP,))

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("llama", **_LLAMA_LIKE),
        Architecture("mistral", **_LLAMA_LIKE),
        Architecture("qwen2", **_LLAMA_LIKE, notes="q/k/v biases"),
        Architecture("qwen3", **_LLAMA_LIKE, notes="per-head q/k norms; head_dim from the config"),
        Architecture("gemma", **_LLAMA_LIKE, notes="GeGLU (tanh GELU)"),
        Architecture("gemma2", **_LLAMA_LIKE, notes="GeGLU; logit soft-capping"),
        Architecture("gemma3_text", **_LLAMA_LIKE, notes="text part of Gemma 3"),
        Architecture("granite", **_LLAMA_LIKE),
        Architecture("olmo2", **_LLAMA_LIKE),
        Architecture("phi3", attention=(FUSED_QKV,), mlp=(FUSED_GATE_UP,), notes="fused qkv, gate_up"),
        Architecture(
            "llama4_text", **_LLAMA_LIKE, not_all_linear="router", notes="text part of Llama 4"
        ),
        Architecture("qwen2_moe", **_LLAMA_LIKE, notes="fused 3-D experts; the shared expert is gated"),
        Architecture("mixtral", **_LLAMA_LIKE, notes="fused 3-D experts: attention only"),
        Architecture("qwen2_5_vl_text", **_LLAMA_LIKE, notes="text part of Qwen2.5-VL"),
        Architecture("qwen2_vl_text", **_LLAMA_LIKE, notes="text part of Qwen2-VL"),
    )
}  # fmt: skip


def text_config(model: nn.Module) -> object | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def architecture(model: nn.Module) -> Architecture:
    """The registry entry of `model`'s family (its text config's `model_type`), or GENERIC."""
    return ARCHITECTURES.get(getattr(text_config(model), "model_type", None), GENERIC)


# ---- blocks and head geometry -------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (weight stored in x out), which slimtune does not patch."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists of blocks that hold linears: the model's block stacks.

    Finds `model.layers` of Llama-style decoders, `model.language_model.layers` of vision-language
    models and `transformer.h` of GPT-2, and skips lists nested inside a block (MoE experts belong
    to their block).
    """
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in stacks):
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if any(isinstance(m, nn.Linear) or is_conv1d(m) for m in module.modules()):
            stacks.append((name, module))
    return stacks


@dataclass(frozen=True)
class HeadGeometry:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def head_geometry(model: nn.Module) -> HeadGeometry:
    """Heads, kv heads (grouped-query attention) and head_dim from the model's (text) config."""
    config = text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise ValueError(f"{type(model).__name__} has no config.num_attention_heads; heads cannot be located")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return HeadGeometry(heads, kv_heads, head_dim)


# ---- modules inside a block ---------------------------------------------------------------------


def _has_children(module: nn.Module, names: tuple[str | None, ...]) -> bool:
    """All named children exist as modules (their types are checked by the method that swaps them)."""
    return all(n is not None and isinstance(module._modules.get(n), nn.Module) for n in names)


def attention_layout(module: nn.Module, arch: Architecture) -> AttentionLayout | None:
    """The layout `module` has if it is an attention module of `arch`, else None."""
    for layout in arch.attention:
        if _has_children(module, (layout.o, *layout.inputs)):
            return layout
    return None


def mlp_layout(module: nn.Module, arch: Architecture) -> MLPLayout | None:
    """The layout `module` has if it holds the projections of a gated MLP of `arch`, else None."""
    for layout in arch.mlp:
        if _has_children(module, (layout.down, *layout.inputs)):
            return layout
    return None


def activation_of(module: nn.Module, layout: MLPLayout) -> tuple[str | None, object]:
    """(kind, module) of a gated MLP's activation; kind is a key of ops.GLU_ACTIVATIONS or None."""
    for name in layout.activations:
        act = getattr(module, name, None)
        if act is not None:
            return activation_kind(act), act
    return None, None


def activation_kind(act: object) -> str | None:
    """The activation a module computes, as a key of ops.GLU_ACTIVATIONS, or None if not known.

    Only a claim to check: the fused path is accepted only after `probe_gated_mlp` agrees.
    """
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanhActivation"):
        return "gelu_tanh"
    return "gelu" if name == "GELUActivation" else None


@dataclass
class BlockLayout:
    """The projections of one block as full module names (None where the block has none), the
    attention and gated-MLP modules holding them, and any MoE expert containers (not nn.Linear)."""

    name: str
    attention: str | None = None
    mlp: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str | None = None
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    down: str | None = None
    experts: list[str] = field(default_factory=list)

    def projections(self) -> list[str]:
        roles = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
        return [name for name in (getattr(self, role) for role in roles) if name]


def _under(owner: str, child: str | None) -> str | None:
    return f"{owner}.{child}" if child else None


def block_layout(block_name: str, block: nn.Module, arch: Architecture) -> BlockLayout:
    """Find the attention module and the (outermost) gated MLP of a block by the registry's layouts."""
    layout = BlockLayout(block_name)
    for child_name, child in block.named_modules():
        path = f"{block_name}.{child_name}" if child_name else block_name
        att = attention_layout(child, arch) if layout.attention is None else None
        if att is not None:
            layout.attention, layout.o, layout.qkv = path, _under(path, att.o), _under(path, att.qkv)
            layout.q, layout.k, layout.v = (_under(path, n) for n in (att.q, att.k, att.v))
        mlp = mlp_layout(child, arch) if layout.mlp is None else None
        if mlp is not None:
            layout.mlp, layout.down, layout.gate_up = path, _under(path, mlp.down), _under(path, mlp.gate_up)
            layout.gate, layout.up = _under(path, mlp.gate), _under(path, mlp.up)
        if child_name.endswith("experts") and not isinstance(child, nn.ModuleList):
            layout.experts.append(path)
    return layout


def sibling_groups(module: nn.Module, arch: Architecture) -> list[tuple[str, ...]]:
    """Child names that `module` calls one after another on one input (q/k/v; gate/up)."""
    groups = []
    att = attention_layout(module, arch)
    if att is not None and att.qkv is None:
        groups.append(att.inputs)
    mlp = mlp_layout(module, arch)
    if mlp is not None and mlp.gate_up is None:
        groups.append(mlp.inputs)
    return groups


def hft_categories(block: nn.Module, arch: Architecture) -> dict[str, list[str]]:
    """Module names of a block by HFT category: attention projections, FFN projections, norms."""
    categories: dict[str, list[str]] = {"attention": [], "ffn": [], "norm": []}
    for name, module in block.named_modules():
        if "norm" in type(module).__name__.lower() and list(module.parameters(recurse=False)):
            categories["norm"].append(name)
        elif isinstance(module, nn.Linear) and re.search(arch.attention_scope, name):
            categories["attention"].append(name)
        elif isinstance(module, nn.Linear) and re.search(arch.ffn_scope, name):
            categories["ffn"].append(name)
    return categories


def projection_names(model: nn.Module) -> list[str]:
    """Leaf names of the attention and gated-MLP projections of the first block (e.g. the 7 of Llama)."""
    arch = architecture(model)
    (prefix, blocks), *_ = block_stacks(model) or [("", [])]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer block list")
    return [name.rsplit(".", 1)[-1] for name in block_layout(f"{prefix}.0", blocks[0], arch).projections()]


# ---- the fused gated-MLP path, accepted by a numerical probe ------------------------------------


@dataclass(frozen=True)
class GatedMLPSpec:
    """Where a gated MLP keeps its projections and which activation it applies."""

    inputs: tuple[str, ...]  # ("gate_proj", "up_proj") or Phi-3's ("gate_up_proj",)
    down: str
    activation: str  # a key of ops.GLU_ACTIVATIONS


def gated_mlp_candidate(module: nn.Module, arch: Architecture) -> tuple[GatedMLPSpec | None, str]:
    """(spec, "") if `module` looks like a gated MLP whose fused path can be probed, else (None, why)."""
    layout = mlp_layout(module, arch)
    if layout is None:
        return None, "not a gated MLP"
    kind, act = activation_of(module, layout)
    if kind is None:
        found = type(act).__name__ if act is not None else f"no attribute {' or '.join(layout.activations)}"
        return None, f"activation not recognised ({found})"
    return GatedMLPSpec(layout.inputs, layout.down, kind), ""


def probe_input(weight: torch.Tensor, *shape: int, seed: int = 0) -> torch.Tensor | None:
    """A seeded random input of `shape` in the weight's dtype and device, or None on the meta device
    (no values to compare): what fused and lean paths are checked on before they are accepted."""
    if weight.device.type == "meta":
        return None
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    return torch.randn(*shape, generator=generator, device=weight.device).to(weight.dtype)


@torch.no_grad()
def probe_gated_mlp(module: nn.Module, spec: GatedMLPSpec, seed: int = 0) -> str | None:
    """Check numerically that `module.forward` computes down(act(gate(x)) * up(x)); None if it does,
    else the reason. Run on a small random input in the module's dtype and device (skipped on meta)."""
    down = getattr(module, spec.down)
    first = getattr(module, spec.inputs[0])
    weight = first.weight
    x = probe_input(weight, 3, first.in_features, seed=seed)
    if x is None:
        return "weights on the meta device: accepted by structure, not probed"
    outs = [getattr(module, name)(x).float() for name in spec.inputs]
    gate, up = outs[0].chunk(2, dim=-1) if len(outs) == 1 else outs
    act, _ = GLU_ACTIVATIONS[spec.activation](gate)
    expected = down((act * up).to(weight.dtype)).float()
    try:
        got = module(x).float()
    except Exception as err:  # a forward with another signature: not the pattern we fuse
        return f"its forward could not be probed ({type(err).__name__}: {err})"
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    scale = expected.abs().max().clamp_min(1e-6)
    if got.shape != expected.shape or ((got - expected).abs().max() / scale) > tolerance:
        return "its forward does not compute down(act(gate(x)) * up(x)) on a probe input"
    return None


# ---- what lean mode swaps ---------------------------------------------------------------------------


def rms_norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a Hugging Face RMSNorm (a module named *RMSNorm with a 1-D weight), else None."""
    if not type(module).__name__.endswith("RMSNorm"):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def final_logit_softcap(model: nn.Module) -> float | None:
    """The LM head's logit soft-capping (Gemma 2), or None."""
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


ROTARY_FUNCTION = "apply_rotary_pos_emb"  # the module-level function HF attention forwards call


def rotary_function(attention: type[nn.Module]) -> object | None:
    """The `apply_rotary_pos_emb(q, k, cos, sin)` an attention class's forward reads from its modeling
    module, or None where the forward calls no function of that name (Llama 4's complex rotation,
    Qwen2-VL's multimodal one). Only a claim: lean mode probes it before replacing it."""
    forward = inspect.unwrap(attention.forward)
    if ROTARY_FUNCTION not in forward.__code__.co_names:
        return None
    return forward.__globals__.get(ROTARY_FUNCTION)


def rotary_width(model: nn.Module) -> int:
    """Features per head that the rotary embedding turns (head_dim x partial_rotary_factor)."""
    factor = getattr(text_config(model), "partial_rotary_factor", None) or 1.0
    return int(head_geometry(model).head_dim * factor)
