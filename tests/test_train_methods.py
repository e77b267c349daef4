"""HFT selection and optimizer state, LiNeS against a hand computation, sparse diffs (LT-SFT)."""

from __future__ import annotations

import pytest
import torch
from slimtune import SparseDelta, load_delta
from slimtune.apps.train import load_recipe, run
from slimtune.apps.train.loop import make_optimizer
from slimtune.apps.train.models import ModelSpec, build
from slimtune.apps.train.runner import stage_seed
from slimtune.apps.train.stage_methods import HFT, Context
from slimtune.toolbox.hft import select as hft_selection
from slimtune.toolbox.lines import scale as lines
from tiny_models import make_model

RECIPE = """\
seed: 0
seq_len: 32
model: {{builtin: tiny-llama}}
method: {method}
tasks:
  - {{name: copy, task: copy, n: 4, stage: a}}
stages:
  - name: a
    data:
      - {{task: copy, n: 64}}
    steps: 3
    batch_size: 4
    lr: 1.0e-2
"""


def _recipe(tmp_path, method: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(method=method))
    return path


def _model(layers: int = 4) -> torch.nn.Module:
    return build(ModelSpec(builtin="tiny-llama", config={"num_hidden_layers": layers}), seed=0)[0]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_hft_picks_half_of_every_block_by_category():
    model = _model(layers=4)
    chosen = hft_selection(model, seed=1)
    wide = 0
    for number in range(4):
        prefix = f"model.layers.{number}."
        inside = [n[len(prefix) :] for n in chosen if n.startswith(prefix)]
        attention = {n for n in inside if n.startswith("self_attn.")}
        ffn = {n for n in inside if n.startswith("mlp.")}
        norms = {n for n in inside if "norm" in n}
        assert len(attention) == 2 and len(norms) == 1 and len(ffn) in (1, 2), inside
        wide += len(ffn) == 2
    assert wide == 2  # 2 of 3 FFN projections in half of the blocks, 1 of 3 in the others
    outside = {n for n, _ in model.named_parameters() if not n.startswith("model.layers.")}
    assert (
        outside == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} and outside <= chosen
    )


def test_hft_draws_a_new_half_each_stage():
    model = _model()
    halves = [frozenset(hft_selection(model, stage_seed(0, name))) for name in ("a", "b", "c", "d")]
    assert len(set(halves)) == 4
    assert hft_selection(model, stage_seed(0, "a")) == halves[0]  # and the same half on a rerun


def test_hft_frozen_half_has_no_optimizer_state(tmp_path):
    model = _model()
    stage = load_recipe(_recipe(tmp_path, "{name: hft}")).stages[0]
    params = HFT().setup(model, Context(seed=3, train=None))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and len(params) + len(frozen) == len(list(model.parameters()))
    before = [p.detach().clone() for p in frozen]
    optimizer = make_optimizer(params, stage)
    ids = torch.randint(4, 90, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} == {id(p) for p in params}
    assert all(p.grad is None for p in frozen)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before, strict=True))


def test_hft_refuses_fused_projections():
    with pytest.raises(ValueError, match="hft picks 2 of 4 attention projections"):
        HFT().check(make_model("phi3"))


def test_lines_matches_a_hand_computation():
    model = _model(layers=3)
    before = _params(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    after = _params(model)
    lines(model, before, alpha=0.3, beta=0.6)
    for name, parameter in model.named_parameters():
        scale = {"model.layers.0.": 0.3, "model.layers.1.": 0.6, "model.layers.2.": 0.9}.get(name[:15], 0.3)
        assert torch.equal(parameter, before[name] + scale * (after[name] - before[name])), name


def _perturbed(seed: int, density: float) -> tuple[torch.nn.Module, dict, dict]:
    """A model with a random sparse set of entries changed, its start and the masks."""
    model = _model()
    start, generator = _params(model), torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=generator) < density for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * masks[name])
    return model, start, masks


def test_entry_diff_applies_and_reverts_exactly(tmp_path):
    trained, start, masks = _perturbed(seed=1, density=0.05)
    diff = load_delta(SparseDelta.between(trained, start, masks).save(tmp_path / "d.safetensors"))
    base = _model()
    diff.apply(base)
    assert all(torch.equal(p, trained.get_parameter(n)) for n, p in base.named_parameters())
    diff.revert(base)
    assert all(torch.equal(p, start[n]) for n, p in base.named_parameters())


def test_entry_diffs_compose_by_addition():
    one, start, masks_one = _perturbed(seed=1, density=0.05)
    two, _, masks_two = _perturbed(seed=2, density=0.05)
    d1, d2 = SparseDelta.between(one, start, masks_one), SparseDelta.between(two, start, masks_two)
    fused, stepwise = _model(), _model()
    (d1 + d2).apply(fused)
    d2.apply(d1.apply(stepwise))
    for name, parameter in fused.named_parameters():
        torch.testing.assert_close(parameter, stepwise.get_parameter(name), rtol=0, atol=1e-6)
    d1.revert(fused)
    for name, parameter in fused.named_parameters():
        torch.testing.assert_close(parameter, two.get_parameter(name), rtol=0, atol=1e-6)


def test_sparse_diff_stage_changes_only_k_entries(tmp_path):
    result = run(_recipe(tmp_path, "{name: sparse-diff, k: 300, dense_steps: 2}"), tmp_path / "run")
    base = build(ModelSpec(builtin="tiny-llama"), seed=0)[0]
    changed = sum(int((p != base.get_parameter(n)).sum()) for n, p in result.model.named_parameters())
    assert 0 < changed <= 300
    load_delta(tmp_path / "run" / "stages" / "01-a" / "diff.safetensors").apply(base)
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in result.model.named_parameters())


def test_a_run_folder_with_an_old_format_diff_resumes_to_the_same_model(tmp_path):
    """Sparse-diff stages of runs made before one diff type saved `slimtune-entry-diff` files:
    `--resume` restores the stage from such a file to the model the run ended with."""
    from safetensors.torch import save_file

    recipe = _recipe(tmp_path, "{name: sparse-diff, k: 300, dense_steps: 2}")
    finished = run(recipe, tmp_path / "run").model
    path = tmp_path / "run" / "stages" / "01-a" / "diff.safetensors"
    tensors = {}
    for name, entry in load_delta(path).entries.items():
        tensors[f"{name}.index"], tensors[f"{name}.values"] = entry.index, entry.values
    save_file(tensors, str(path), metadata={"format": "slimtune-entry-diff"})
    resumed = run(recipe, tmp_path / "run", resume=True).model
    assert all(torch.equal(p, finished.get_parameter(n)) for n, p in resumed.named_parameters())
