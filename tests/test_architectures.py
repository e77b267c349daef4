"""The architecture registry on ten families (incl. mixture-of-experts and the text parts of two
vision-language models): which fusions and methods each gets, identical logits after `apply`,
gradients only for the trained entries, a loss that falls, and clear refusals where a layout
cannot take a method. This is the coverage table of docs/architecture.md."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import slimtune
import slimtune.layers
import torch
import transformers
from slimtune.architectures import architecture, block_stacks, head_geometry, projection_names
from tiny_models import COMMON, make_batch
from torch import nn

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 24}),
    "gemma2": ("Gemma2Config", {"head_dim": 24}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 24}),  # text part of Gemma 3 (vision-language)
    "llama4_text": (  # text part of Llama 4 (vision-language), dense and MoE blocks interleaved
        "Llama4TextConfig",
        {"num_local_experts": 2, "intermediate_size_mlp": 88, "interleave_moe_layer_step": 2, "head_dim": 16},
    ),
    "qwen2_moe": (  # mixture of experts with a shared gated expert
        "Qwen2MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "shared_expert_intermediate_size": 48},
    ),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),  # experts only
}  # fmt: skip

# (fused gated MLPs, S2FT channels available) per family: the coverage table.
COVERAGE = {
    "llama": (2, True),
    "qwen2": (2, True),
    "qwen3": (2, True),
    "mistral": (2, True),
    "gemma": (2, True),
    "gemma2": (2, True),
    "phi3": (2, True),
    "gemma3_text": (2, True),
    "llama4_text": (2, True),  # block 1 is MoE: its shared expert is the gated MLP
    "qwen2_moe": (2, True),  # the shared expert
    "mixtral": (0, False),
}


def build(family: str, seed: int = 0) -> nn.Module:
    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


def s2ft_config(family: str) -> slimtune.S2FTConfig:
    return slimtune.S2FTConfig(heads=1, channels=8 if COVERAGE[family][1] else 0)


METHODS = {
    "paca": lambda family: slimtune.PaCAConfig(r=4),
    "s2ft": s2ft_config,
    "lora": lambda family: slimtune.LoRAConfig(r=4, alpha=8),
    "hydra": lambda family: slimtune.HydraConfig(r_parallel=2, r_sequential=2, alpha=4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_entry_blocks_and_geometry(family: str) -> None:
    model = build(family)
    assert architecture(model).name == model.config.model_type
    (prefix, blocks), *_ = block_stacks(model)
    assert prefix == "model.layers" and len(blocks) == COMMON["num_hidden_layers"]
    geometry = head_geometry(model)
    assert geometry.heads == 4 and geometry.kv_heads == 2
    assert {"o_proj"} <= set(projection_names(model))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_every_method(family: str, method: str) -> None:
    model = build(family)
    ids = make_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every fusion of these families is accepted: no fallback warning
        slimtune.apply(model, METHODS[method](family))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)

    params = slimtune.trainable_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # Exactly the trained tensors get gradients; everything else stays frozen and gradient-free.
        for p in model.parameters():
            assert (p.grad is not None) == p.requires_grad, names[id(p)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    report = slimtune.report(model)
    assert report["method"] == method and report["architecture"] == model.config.model_type
    if method in ("lora", "hydra"):
        assert len(report["fused gated MLPs"]) == COVERAGE[family][0]
        assert report["unfused gated MLPs"] == {}


def test_s2ft_channels_on_experts_are_refused_by_name() -> None:
    model = build("mixtral")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model\.layers\.0.*mixture of experts.*experts.*set channels=0"):
        slimtune.apply(model, slimtune.S2FTConfig(heads=1, channels=4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, slimtune.layers.S2FTLinear) for m in model.modules())


class OddMLP(nn.Module):
    """Looks like a gated MLP (same children) but computes down(act(gate(x)) - up(x))."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            original.gate_proj,
            original.up_proj,
            original.down_proj,
        )
        self.act_fn = original.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) - self.up_proj(x))


def test_fused_path_is_accepted_only_after_the_probe_and_fallbacks_are_reported() -> None:
    model = build("llama")
    model.model.layers[1].mlp = OddMLP(model.model.layers[1].mlp)
    ids = make_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"1 gated MLPs run the unfused.*OddMLP.*does not compute"):
        slimtune.apply(model, slimtune.LoRAConfig(r=4, alpha=8))
    report = slimtune.report(model)
    assert report["fused gated MLPs"] == ["model.layers.0.mlp"]
    assert list(report["unfused gated MLPs"]) == ["model.layers.1.mlp"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    slimtune.merge(model)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"  # the original module is back


@pytest.mark.parametrize("method", METHODS)
def test_patched_models_deepcopy_and_pickle(method: str) -> None:
    """No lambdas, partials or hooks that do not survive: copies behave like the original, and a
    PartialAdamW bound to the model moves with it."""
    model = build("llama")
    slimtune.apply(model, METHODS[method]("llama"))
    ids = make_batch()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for clone in copies:
        optimizer = slimtune.PartialAdamW(clone, lr=1e-2)
        with torch.no_grad():
            torch.testing.assert_close(clone(input_ids=ids).logits, expected)
        clone(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            moved = clone(input_ids=ids).logits
        assert not torch.allclose(moved, expected)
        # The trained entries reached the weights (the forward ran on them): merge gives the same logits.
        with torch.no_grad():
            torch.testing.assert_close(
                slimtune.merge(clone)(input_ids=ids).logits, moved, rtol=1e-5, atol=1e-5
            )


def test_optimizer_and_model_deepcopied_together_stay_bound() -> None:
    model = build("llama")
    slimtune.apply(model, slimtune.PaCAConfig(r=4))
    optimizer = slimtune.PartialAdamW(model, lr=1e-2)
    model2, optimizer2 = copy.deepcopy((model, optimizer))
    assert {id(layer) for layer in optimizer2.layers} == {
        id(m) for m in model2.modules() if isinstance(m, slimtune.layers.PaCALinear)
    }
    ids = make_batch()
    model2(input_ids=ids, labels=ids).loss.backward()
    optimizer2.step()
    layer = model2.model.layers[0].mlp.down_proj
    assert torch.equal(layer.weight[:, layer.paca_index], layer.paca_columns)  # the fused write happened
    assert not layer.needs_sync()
