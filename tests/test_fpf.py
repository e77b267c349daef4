"""FPF and k-FPF: only the chosen modules train, on a buffer of the data so far; `auto` follows the
drift; k-FPF runs k times during the stage; bad settings are refused before training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from slimtune.apps.train import RecipeError, loop, run
from slimtune.apps.train.data import Packed
from slimtune.apps.train.fpf import buffer, choose, finetune
from slimtune.apps.train.operations import FPF
from slimtune.apps.train.recipe import load_recipe
from slimtune.toolbox.fpf import drift, owners, snapshot
from tiny_models import make_model


def _recipe(tmp_path, post=None, kfpf=None, method=None, name="recipe.yaml"):
    stage = {"steps": 4, "batch_size": 4, "lr": 1e-2}
    data = {
        "seed": 3,
        "seq_len": 32,
        "model": {"builtin": "tiny-llama"},
        "method": method or {"name": "full"},
        "tasks": [
            {"name": "copy", "task": "copy", "n": 4, "stage": "a"},
            {"name": "reverse", "task": "reverse", "n": 4, "stage": "b"},
        ],
        "stages": [
            {"name": "a", "data": [{"task": "copy", "n": 32}], **stage},
            {"name": "b", "data": [{"task": "reverse", "n": 32}], **stage},
        ],
    }
    if post is not None:
        data["stages"][1]["post"] = post
    if kfpf is not None:
        data["stages"][1]["kfpf"] = kfpf
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_fpf_changes_only_the_listed_modules(tmp_path):
    plain = run(_recipe(tmp_path, name="plain.yaml"), tmp_path / "plain").model
    listed = ["lm_head", "layers.1.mlp.down_proj"]
    post = [{"fpf": {"buffer": 8, "modules": listed, "steps": 3, "lr": 1e-2, "batch_size": 4}}]
    tuned = run(_recipe(tmp_path, post), tmp_path / "fpf").model
    changed = {name for name, p in tuned.named_parameters() if not torch.equal(p, plain.get_parameter(name))}
    assert changed == {"lm_head.weight", "model.layers.1.mlp.down_proj.weight"}
    record = json.loads(next((tmp_path / "fpf" / "stages").glob("02-*/result.json")).read_text())
    (step,) = record["fpf"]
    assert step["modules"] == ["model.layers.1.mlp.down_proj", "lm_head"] and step["buffer_rows"] == 8
    assert len(step["losses"]) == 3


def test_auto_picks_the_modules_that_drifted_most(tmp_path):
    post = [{"fpf": {"modules": "auto", "top": 3, "steps": 2, "buffer": 4, "batch_size": 4}}]
    run(_recipe(tmp_path, post), tmp_path / "run")
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "stages").glob("*/result.json"))]
    mean = {m: (records[0]["drift"][m] + records[1]["drift"][m]) / 2 for m in records[0]["drift"]}
    top = sorted(mean, key=lambda m: (-mean[m], m))[:3]
    assert records[1]["fpf"][0]["modules"] == top


def test_drift_and_choose():
    model = make_model("llama")
    start = snapshot(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
        model.model.norm.weight.add_(0.01)
    moved = drift(model, start)
    assert moved["model.layers.0.mlp.up_proj"] == pytest.approx(0.5)
    assert moved["model.layers.1.mlp.up_proj"] == 0.0
    assert choose(model, FPF(top=2), [moved]) == ["model.layers.0.mlp.up_proj", "model.norm"]
    with pytest.raises(ValueError, match="match no module"):
        choose(model, FPF(modules=("nonexistent",)), [])


def test_buffer_draws_evenly_from_every_stage():
    packs = [Packed(torch.full((10, 4), i), torch.full((10, 4), i), torch.ones(10, 4)) for i in range(3)]
    rows = buffer(packs, 7, seed=0)
    assert len(rows) == 7
    assert [int((rows.ids[:, 0] == i).sum()) for i in range(3)] == [3, 2, 2]


def test_finetune_restores_flags_and_mode(tmp_path):
    model = make_model("llama").train()
    before = copy.deepcopy(model)
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 97, (4, 12))
    rows = Packed(ids, ids.clone(), torch.ones_like(ids))
    recipe = load_recipe(_recipe(tmp_path))
    losses = finetune(model, ["model.norm"], rows, FPF(steps=2, lr=1e-2, batch_size=2), recipe.stages[0],
                      loop.World.start("cpu"), seed=0)  # fmt: skip
    assert len(losses) == 2 and model.training
    assert not model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert changed == ["model.norm.weight"]
    assert set(owners(model)) >= {"model.norm", "lm_head", "model.embed_tokens"}


def test_kfpf_runs_k_times_during_the_stage(tmp_path):
    kfpf = {"k": 2, "buffer": 4, "modules": "auto", "top": 2, "steps": 2, "batch_size": 4}
    run(_recipe(tmp_path, kfpf=kfpf), tmp_path / "run")
    record = json.loads(next((tmp_path / "run" / "stages").glob("02-*/result.json")).read_text())
    assert [k["after_step"] for k in record["kfpf"]] == [2, 4]
    assert all(len(k["modules"]) == 2 and len(k["losses"]) == 2 for k in record["kfpf"])
    assert len(record["losses"]) == 4  # the stage's own steps


@pytest.mark.parametrize(
    ("post", "kfpf", "method", "match"),
    [
        (None, {"k": 2}, {"name": "lora", "r": 2, "alpha": 4}, "needs method full or hft"),
        (None, {"buffer": 4}, None, "missing required key 'k'"),
        ([{"fpf": {"modules": ["no_such_module"]}}], None, None, "match no module"),
        ([{"fpf": {"modules": ["auto", "lm_head"]}}], None, None, "not both"),
        ([{"fpf": {"steps": 0}}], None, None, "must be > 0"),
        ([{"fpf": {"stepz": 3}}], None, None, "unknown key 'stepz'"),
    ],
)
def test_bad_fpf_settings_are_refused_before_training(tmp_path, post, kfpf, method, match):
    with pytest.raises(RecipeError, match=match):
        run(_recipe(tmp_path, post, kfpf, method), tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()
