"""Grafting: the full mask reproduces the fine-tuned model, the empty mask the base; the learned
mask recovers a fine-tune's loss better than a random one of the same size; overlaps are Jaccard."""

from __future__ import annotations

import copy
import math

import slimtune
import torch
from slimtune.toolbox.graft import _top_mask, graft_diff, localize, overlap, task_loss
from tiny_models import make_batch, make_model


def _tuned(base):
    tuned = copy.deepcopy(base)
    ids = make_batch(seed=3)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    for _ in range(5):
        tuned(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tuned, {"input_ids": ids, "labels": ids}


def _linear_masks(base, value: bool):
    from slimtune.toolbox.graft import _weights

    return {
        name: torch.full_like(w, value, dtype=torch.bool) for name, w in _weights(base, "all-linear").items()
    }


def test_full_and_empty_masks_give_the_fine_tuned_and_the_base_model() -> None:
    base = make_model("llama")
    tuned, batch = _tuned(base)
    ids = batch["input_ids"]
    full = graft_diff(base, tuned, _linear_masks(base, True)).apply(copy.deepcopy(base))
    for name, module in full.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
            assert torch.equal(module.weight, tuned.get_submodule(name).weight), name
    empty = graft_diff(base, tuned, _linear_masks(base, False)).apply(copy.deepcopy(base))
    with torch.no_grad():
        assert torch.equal(empty(input_ids=ids).logits, base(input_ids=ids).logits)


def test_the_learned_region_recovers_more_than_a_random_one() -> None:
    base = make_model("llama")
    tuned, batch = _tuned(base)
    diff, masks = localize(base, tuned, task_loss(batch), sparsity=0.02, steps=30, lr=0.2)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == round(0.02 * total) or kept == int(0.02 * total) + 1
    generator = torch.Generator().manual_seed(0)
    noise = {name: torch.rand(m.shape, generator=generator) for name, m in masks.items()}
    random = graft_diff(base, tuned, _top_mask(noise, 0.02))
    with torch.no_grad():
        losses = {
            name: float(d.apply(copy.deepcopy(base))(**batch).loss)
            for name, d in (("learned", diff), ("random", random))
        }
        base_loss, tuned_loss = float(base(**batch).loss), float(tuned(**batch).loss)
    assert tuned_loss < losses["learned"] < losses["random"] <= base_loss + 1e-3, (
        losses,
        base_loss,
        tuned_loss,
    )
    assert overlap(masks, masks)["jaccard"] == 1.0
    disjoint = {name: ~m for name, m in masks.items()}
    assert overlap(masks, disjoint) == {"jaccard": 0.0, "of_first": 0.0, "of_second": 0.0}


def _graft_recipe(tmp_path, apply: bool = False, **settings):
    import yaml

    stage = {"steps": 4, "batch_size": 4, "lr": 1e-2}
    graft = {"graft": {"sparsity": 0.01, "steps": 3, "batch_size": 4, "apply": apply, **settings}}
    data = {
        "seed": 2,
        "seq_len": 32,
        "model": {"builtin": "tiny-llama"},
        "tasks": [
            {"name": "copy", "task": "copy", "n": 4, "stage": "a"},
            {"name": "reverse", "task": "reverse", "n": 4, "stage": "b"},
        ],
        "stages": [
            {"name": "a", "data": [{"task": "copy", "n": 32}], **stage, "post": [graft]},
            {"name": "b", "data": [{"task": "reverse", "n": 32}], **stage, "post": [graft]},
        ],
    }
    path = tmp_path / f"graft-{apply}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_graft_operation_reports_recovery_and_overlap(tmp_path) -> None:
    import json

    import pytest
    from slimtune.apps.train import run

    run(_graft_recipe(tmp_path), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(report["grafts"]) == {"a", "b"} and set(report["graft_overlap"]) == {"a|b"}
    a = report["grafts"]["a"]
    assert 0 < a["share"] <= 0.0101 and set(a["tasks"]) == {"copy"}
    copy_scores = a["tasks"]["copy"]
    assert set(copy_scores) == {"accuracy", "loss"}
    loss = copy_scores["loss"]
    assert set(loss) == {"start", "tuned", "graft", "recovered"}
    assert loss["recovered"] == pytest.approx(
        (loss["graft"] - loss["start"]) / (loss["tuned"] - loss["start"])
    )
    overlap = report["graft_overlap"]["a|b"]
    assert 0.0 <= overlap["jaccard"] <= min(overlap["of_first"], overlap["of_second"]) <= 1.0
    diff = slimtune.load_delta(next((tmp_path / "run" / "stages").glob("01-*/graft.safetensors")))
    assert sum(e.count for e in diff.entries.values()) == a["entries"]


def test_applied_graft_continues_from_start_plus_graft(tmp_path) -> None:
    from slimtune.apps.train import load_recipe, models, run

    path = _graft_recipe(tmp_path, apply=True)
    final = run(path, tmp_path / "run").model
    folder = tmp_path / "run" / "stages"
    # With `apply`, each stage ends at its start plus its graft: the final model minus both grafts
    # is the base model, every parameter (embeddings and norms too, which no graft touches).
    for stage in ("02-b", "01-a"):
        slimtune.load_delta(folder / stage / "graft.safetensors").revert(final)
    recipe = load_recipe(path)
    base, _ = models.build(recipe.model, recipe.seed)
    for name, p in final.named_parameters():
        torch.testing.assert_close(p, base.get_parameter(name), atol=1e-6, rtol=0, msg=name)


def test_a_graft_needs_a_task_the_stage_teaches(tmp_path) -> None:
    import pytest
    import yaml
    from slimtune.apps.train import RecipeError, run

    path = _graft_recipe(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["tasks"][0].pop("stage")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match="give a task `stage: a`"):
        run(path, tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()


def _authors_reference(base, tuned, batches, sparsity, steps, lr, seed):
    """The authors' update written as their code does it (graft_trainer.py): the model interpolated
    in place, parameter gradients times (tuned - base) averaged over the batches, then
    score -= (1 - 2 s) * g * sigmoid'(score - 10); the rounded mask with the lowest loss is kept."""
    from slimtune.toolbox.graft import _weights

    names = list(_weights(base, "all-linear"))
    pre = {n: base.get_parameter(n).detach() for n in names}
    delta = {n: tuned.get_parameter(n).detach() - pre[n] for n in names}
    region = {n: m.float() for n, m in _top_mask({n: d.abs() for n, d in delta.items()}, sparsity).items()}
    generator = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(region[n].shape, generator=generator) for n in names}
    model = copy.deepcopy(base)

    def set_fraction(fraction):
        with torch.no_grad():
            for n in names:
                model.get_parameter(n).copy_(pre[n] + fraction[n] * delta[n])

    best, best_loss = None, float("inf")
    for _ in range(steps):
        set_fraction({n: region[n] + (1 - 2 * region[n]) * torch.sigmoid(scores[n] - 10) for n in names})
        total = {n: torch.zeros_like(pre[n]) for n in names}
        for batch in batches:
            model(**batch).loss.backward()
            for n in names:
                total[n] += lr * model.get_parameter(n).grad * delta[n]
            model.zero_grad()
        for n in names:
            sig = torch.sigmoid(scores[n] - 10)
            scores[n] -= (1 - 2 * region[n]) * (total[n] / len(batches)) * sig * (1 - sig)
        mask = {n: (region[n] + (1 - 2 * region[n]) * torch.sigmoid(scores[n] - 10)) > 0.5 for n in names}
        set_fraction({n: m.float() for n, m in mask.items()})
        with torch.no_grad():
            value = sum(float(model(**b).loss) for b in batches) / len(batches)
        if value < best_loss:
            best, best_loss = mask, value
    return best


def test_the_authors_procedure_matches_their_update_and_lets_the_mask_grow() -> None:
    base = make_model("llama")
    tuned, _ = _tuned(base)
    batches = [{"input_ids": ids, "labels": ids} for ids in (make_batch(seed=3), make_batch(seed=4))]
    calls = [0]

    def loss(model, params):  # the two batches in turn, as the accumulation reads them
        calls[0] += 1
        return task_loss(batches[(calls[0] - 1) % 2])(model, params)

    settings = {"sparsity": 0.01, "steps": 4, "lr": 3e6}
    _, masks = localize(base, tuned, loss, **settings, procedure="authors", accumulate=2, seed=5)
    expected = _authors_reference(base, tuned, batches, **settings, seed=5)
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
    kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    assert 0 < kept < total and kept != math.ceil(0.01 * total)  # flips change its size: no fixed budget


def test_a_recipe_grafts_with_the_authors_procedure(tmp_path) -> None:
    import json

    import pytest
    from slimtune.apps.train import RecipeError, run

    run(_graft_recipe(tmp_path, procedure="authors", accumulate=2), tmp_path / "run")
    grafts = json.loads((tmp_path / "run" / "metrics.json").read_text())["grafts"]
    assert set(grafts) == {"a", "b"} and all(g["entries"] > 0 for g in grafts.values())
    with pytest.raises(RecipeError, match=r"graft\.procedure: 'paper' is not one of budget, authors"):
        run(_graft_recipe(tmp_path, procedure="paper"), tmp_path / "other")
