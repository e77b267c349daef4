"""slimtune layers under torch.compile (inductor, CPU): same losses and gradients as eager, no
graph break caused by slimtune, a decoder block compiles with fullgraph=True, and training
steps under compile follow the eager trajectory (the trained entries reach the weight)."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
import torch._dynamo as dynamo
from tiny_models import make_batch, make_model

CONFIGS = {
    "paca": slimtune.PaCAConfig(r=4),
    "s2ft": slimtune.S2FTConfig(heads=1, channels=8, train_v_rows=True),
    "lora": slimtune.LoRAConfig(r=4, alpha=8),
    "hydra": slimtune.HydraConfig(r_parallel=2, r_sequential=3, alpha=4),
}
FAMILIES = ["llama", "phi3"]  # separate q/k/v + gate/up, and Phi-3's fused qkv_proj / gate_up_proj
# The default run trains each method under compile on one family (every family and method in `-m
# slow`): Phi-3's fused projections for the adapters and PaCA, Llama's separate q/k/v for S2FT.
SHORT = {("phi3", "paca"), ("phi3", "lora"), ("phi3", "hydra"), ("llama", "s2ft")}
CASES = [
    pytest.param(family, method, marks=() if (family, method) in SHORT else pytest.mark.slow)
    for family in FAMILIES
    for method in CONFIGS
]


def patched(family: str, method: str) -> torch.nn.Module:
    model = make_model(family)
    slimtune.apply(model, CONFIGS[method])
    with torch.no_grad():  # move every adapter off its identity init so gradients reach every tensor
        for p in slimtune.trainable_parameters(model):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in slimtune.trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def graph_breaks(model: torch.nn.Module, ids: torch.Tensor) -> int:
    dynamo.reset()
    return dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count


@pytest.mark.parametrize("family, method", CASES)
def test_compiled_model_matches_eager_and_trains(family: str, method: str) -> None:
    ids = make_batch()
    eager = patched(family, method)
    compiled_model = copy.deepcopy(eager)
    dynamo.reset()
    compiled = torch.compile(compiled_model)

    # The plain model compiles without a break here, so any break would be slimtune's.
    assert graph_breaks(make_model(family), ids) == 0
    assert graph_breaks(eager, ids) == 0

    # SGD: Adam's normalised step turns ulp-level gradient noise on near-zero gradients into lr-sized
    # differences, which would hide the comparison this test makes.
    opt_eager = torch.optim.SGD(slimtune.trainable_parameters(eager), lr=0.5)
    opt_compiled = torch.optim.SGD(slimtune.trainable_parameters(compiled_model), lr=0.5)
    for step in range(3):
        loss, grads = loss_and_grads(eager, ids)
        ids_c = ids.clone()
        loss_c = compiled(input_ids=ids_c, labels=ids_c).loss
        loss_c.backward()
        grads_c = [p.grad.clone() for p in slimtune.trainable_parameters(compiled_model)]
        torch.testing.assert_close(loss_c.detach(), loss, rtol=1e-5, atol=1e-5, msg=f"step {step} loss")
        assert len(grads_c) == len(grads) and all(g.abs().sum() > 0 for g in grads)
        for i, (g_c, g) in enumerate(zip(grads_c, grads, strict=True)):
            torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-5, msg=f"step {step} grad {i}")
        for p in slimtune.trainable_parameters(eager):
            p.grad = grads.pop(0)
        opt_eager.step()
        opt_compiled.step()
        eager.zero_grad(set_to_none=True)
        compiled_model.zero_grad(set_to_none=True)

    # After training, the merged weights agree: the compiled forward wrote the trained entries.
    for (name, a), (_, b) in zip(
        slimtune.merge(eager).state_dict().items(),
        slimtune.merge(compiled_model).state_dict().items(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", CONFIGS)
def test_decoder_block_compiles_fullgraph(method: str) -> None:
    model = patched("llama", method)
    block = model.model.layers[0]
    hidden = torch.randn(2, 7, model.config.hidden_size, requires_grad=True)
    position_ids = torch.arange(7)[None].expand(2, -1)
    rope = model.model.rotary_emb(hidden, position_ids)
    expected = block(hidden, position_embeddings=rope, attention_mask=None)
    expected = expected[0] if isinstance(expected, tuple) else expected
    dynamo.reset()
    got = torch.compile(block, fullgraph=True)(hidden, position_embeddings=rope, attention_mask=None)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(got.sum(), hidden)
    (dx_ref,) = torch.autograd.grad(expected.sum(), hidden)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)


def test_custom_ops_pass_opcheck() -> None:
    """torch.library's own checks (schema, fake tensors, autograd registration) on every op."""
    from slimtune import library

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=gen, requires_grad=True)
    w = torch.randn(6, 9, generator=gen)
    idx = torch.tensor([0, 4, 7])
    trained = w[:, idx].clone().requires_grad_(True)
    cases = [
        (library.gather_columns, (x.detach(), idx)),
        (library.column_grad, (torch.randn(5, 6), x.detach(), idx, torch.float32)),
        (library.partial_linear, (x, w, None, trained, idx, 1, True)),
        (library.lora_linear, (x.detach(), w, None, torch.randn(5, 2), torch.randn(6, 2))),
        (library.glu_down, (torch.randn(5, 4), torch.randn(5, 4), torch.randn(2, 4), "silu")),
        (library.glu_backward, (torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4), "gelu_tanh")),
        (
            library.lora_project,
            (x, None, torch.randn(4, 9, requires_grad=True), [2, 2], [w, w], [None, None],
             [torch.randn(6, 2, requires_grad=True), torch.randn(6, 2, requires_grad=True)]),
        ),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("method", ["paca", "s2ft"])
def test_training_and_eval_compile_once_each(method: str) -> None:
    """No recompile per step: one graph for training forwards, one for no-grad evaluation."""
    from torch._dynamo.utils import counters

    model = patched("llama", method)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    ids = make_batch()
    optimizer = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=1e-3)
    for _ in range(4):
        compiled(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        compiled(input_ids=ids)
    assert counters["stats"]["unique_graphs"] == 2
