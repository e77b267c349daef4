"""CorDA: covariance collection, the decomposition, outputs at init, PEFT's CorDA, save/load/merge."""

from __future__ import annotations

import copy

import peft
import pytest
import slimtune
import torch
from slimtune.corda import covariances, decompose
from tiny_models import make_batch, make_model


def _batches(count: int = 4, seq: int = 9, rows: int = 1) -> list[torch.Tensor]:
    return [make_batch(batch=rows, seq=seq, seed=10 + i) for i in range(count)]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_covariance_is_the_scaled_mean_and_siblings_share_one():
    model = make_model("llama")
    batches = _batches(3, rows=2)
    inputs = {}
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: inputs.setdefault("down", []).extend(a[0].detach().double().unbind(0))
    )
    cov = covariances(model, batches)
    handle.remove()
    assert len(inputs["down"]) == 6  # a mean over sequences, each scaled by its own maximum
    expected = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in inputs["down"]) / len(inputs["down"])
    torch.testing.assert_close(cov["model.layers.0.mlp.down_proj"], expected)
    attn = [cov[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv"]
    assert attn[0] is attn[1] is attn[2] and attn[0].dtype == torch.float64
    assert cov["model.layers.1.self_attn.o_proj"] is not attn[0]


@pytest.mark.parametrize("mode", ["corda-kpm", "corda-ipm"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_init_keeps_outputs_and_adapter_spans_the_chosen_components(family, mode):
    model = make_model(family)
    ids = make_batch()
    before = model(ids).logits
    cov = covariances(model, _batches())
    config = slimtune.LoRAConfig(r=4, alpha=8, init=mode)
    weights = {n: m.weight.detach().clone() for n, m in slimtune.targets.match_targets(model, "all-linear")}
    slimtune.corda.apply(model, config, cov)
    torch.testing.assert_close(model(ids).logits, before, atol=2e-5, rtol=1e-5)
    for name, layer in slimtune.patching.patched_layers(model).items():
        change = (layer.lora_B.double() @ layer.lora_A.double()) * layer.scaling
        torch.testing.assert_close(layer.weight.double() + change, weights[name].double(), atol=1e-6, rtol=0)
        # In the context's basis (W C), the adapter is exactly the r smallest (kpm) or largest (ipm)
        # singular components: its singular values there are those of W C.
        _, s, _ = decompose(weights[name], cov[name])
        c = (
            cov[name]
            + torch.eye(cov[name].shape[0], dtype=torch.float64) * cov[name].diagonal().mean() * 0.01
        )
        mine = torch.linalg.svdvals(change @ c)[:4]
        chosen = s[-4:] if mode == "corda-kpm" else s[:4]
        torch.testing.assert_close(mine, chosen.sort(descending=True).values, rtol=1e-5, atol=1e-8)


def _same_adapters_as_peft(ours: torch.nn.Module, ref: torch.nn.Module, rank: int) -> None:
    """Every adapter's components and residual base weight equal PEFT's (an SVD fixes each component
    only up to a sign shared by its two factors, so components are compared as outer products)."""
    for name, layer in slimtune.patching.patched_layers(ours).items():
        theirs = ref.base_model.model.get_submodule(name)
        a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        for i in range(rank):
            mine = torch.outer(layer.lora_B[:, i], layer.lora_A[i])
            torch.testing.assert_close(mine, torch.outer(b[:, i], a[i]), atol=2e-4, rtol=2e-3)
        torch.testing.assert_close(layer.weight, theirs.base_layer.weight, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_same_adapter_and_outputs_as_peft_corda(mode):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    base = make_model("llama")
    batches = _batches()  # PEFT's hook takes one sequence per call
    targets = ["q_proj", "v_proj", "down_proj"]
    ref = copy.deepcopy(base)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )  # fmt: skip
    preprocess_corda(ref, lora, run_model=lambda: [ref(b) for b in batches])
    ref = peft.get_peft_model(ref, lora)
    ours = copy.deepcopy(base)
    config = slimtune.LoRAConfig(r=4, alpha=8, target_modules=targets, init=f"corda-{mode}")
    slimtune.corda.apply(ours, config, covariances(ours, batches, targets))
    _same_adapters_as_peft(ours, ref, rank=4)
    ids = make_batch()
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_peft_covariance_and_adapter_for_any_batch_shape_with_padding(rows):
    """PEFT's hook takes one sequence per call; the trainer feeds 8 left-padded rows per forward with
    their attention mask. The same 24 sequences (lengths 5 to 9) in batches of 1, 3 or 8 rows give
    PEFT's covariances and adapters."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    base = make_model("llama")
    sequences = [make_batch(batch=1, seq=5 + i % 5, seed=40 + i)[0] for i in range(24)]
    targets = ["q_proj", "o_proj", "down_proj"]
    ref = copy.deepcopy(base)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                           corda_config=CordaConfig(corda_method="ipm"))  # fmt: skip
    preprocess_corda(ref, lora, run_model=lambda: [ref(s[None]) for s in sequences])
    ref = peft.get_peft_model(ref, lora)
    batches = []
    for start in range(0, 24, rows):
        part = sequences[start : start + rows]
        width = max(len(s) for s in part)
        ids = torch.stack([torch.cat([s.new_zeros(width - len(s)), s]) for s in part])
        mask = torch.stack(
            [torch.cat([torch.zeros(width - len(s)), torch.ones(len(s))]) for s in part]
        ).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    ours = copy.deepcopy(base)
    config = slimtune.LoRAConfig(r=4, alpha=8, target_modules=targets, init="corda-ipm")
    cov = covariances(ours, batches, targets)
    alone = covariances(copy.deepcopy(base), [s[None] for s in sequences], targets)
    for name in cov:
        torch.testing.assert_close(cov[name], alone[name], rtol=1e-5, atol=1e-7)
    slimtune.corda.apply(ours, config, cov)
    _same_adapters_as_peft(ours, ref, rank=4)


def test_batches_of_padding_only_are_no_sequences():
    model = make_model("llama")
    ids = make_batch(batch=2, seq=6)
    cov = covariances(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}, ids[:1]])
    assert torch.equal(
        cov["model.layers.0.mlp.down_proj"], covariances(model, [ids[:1]])["model.layers.0.mlp.down_proj"]
    )
    with pytest.raises(ValueError, match="never ran on a sequence"):
        covariances(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])


def _trained_corda(mode: str = "corda-kpm"):
    base = make_model("llama")
    model = copy.deepcopy(base)
    config = slimtune.LoRAConfig(r=4, alpha=8, init=mode)
    slimtune.corda.apply(model, config, covariances(model, _batches()))
    with torch.no_grad():
        for p in slimtune.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    return base, model


def test_checkpoint_reloads_onto_the_original_base(tmp_path):
    base, model = _trained_corda()
    ids = make_batch()
    slimtune.save(model, tmp_path / "ckpt")
    loaded = slimtune.load(copy.deepcopy(base), tmp_path / "ckpt")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    merged = slimtune.merge(loaded)
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="CorDA adapters"):
        slimtune.unmerge(merged)


def test_checkpoint_without_its_initial_factors_is_refused(tmp_path):
    base, model = _trained_corda()
    slimtune.save(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "adapter.safetensors"
    if not path.exists():
        (path,) = (tmp_path / "ckpt").glob("*.safetensors")
    tensors, meta = slimtune.files.read_tensors(path)
    kept = {k: v for k, v in tensors.items() if not k.endswith("corda_A")}
    slimtune.files.save_tensors(kept, path, metadata=meta)
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match="corda_A"):
        slimtune.load(target, tmp_path / "ckpt")
    assert _same_state(target, base)


def test_peft_export_is_a_plain_lora_on_the_original_base(tmp_path):
    base, model = _trained_corda("corda-ipm")
    ids = make_batch()
    slimtune.save(model, tmp_path / "peft", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)
    again = slimtune.load_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)


def test_refusals_leave_the_model_untouched():
    model = make_model("llama")
    original = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"slimtune\.corda\.apply"):
        slimtune.apply(model, slimtune.LoRAConfig(r=2, alpha=4, init="corda-kpm"))
    cov = covariances(model, _batches(2))
    cov["model.layers.1.mlp.down_proj"] = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"down_proj.*another model"):
        slimtune.corda.apply(model, slimtune.LoRAConfig(r=2, alpha=4, init="corda-kpm"), cov)
    del cov["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"no covariance for model\.layers\.1\.mlp\.down_proj"):
        slimtune.corda.apply(model, slimtune.LoRAConfig(r=2, alpha=4, init="corda-ipm"), cov)
    with pytest.raises(ValueError, match="init"):
        slimtune.LoRAConfig(r=2, alpha=4, init="pissa")
    assert _same_state(model, original) and slimtune.state.patch_state(model) is None


def test_trainer_stage_checkpoint_reloads_onto_the_base(tmp_path):
    import yaml
    from slimtune.apps.train import load_recipe, models, run

    data = {
        "seed": 0,
        "seq_len": 32,
        "model": {"builtin": "tiny-llama"},
        "tasks": [{"name": "copy", "task": "copy", "n": 4, "stage": "a"}],
        "stages": [
            {
                "name": "a",
                "data": [{"task": "copy", "n": 32}],
                "method": {"name": "lora", "r": 2, "alpha": 4, "init": "corda-kpm"},
                "corda": {"data": [{"task": "reverse", "n": 16}], "rows": 8},
                "steps": 3,
                "batch_size": 4,
                "lr": 1e-2,
            }
        ],
    }
    path = tmp_path / "corda.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    final = run(path, tmp_path / "run").model
    recipe = load_recipe(path)
    base, _ = models.build(recipe.model, recipe.seed)
    slimtune.merge(slimtune.load(base, tmp_path / "run" / "stages" / "01-a" / "slimtune"))
    ids = make_batch()
    torch.testing.assert_close(base(ids).logits, final(ids).logits, atol=1e-5, rtol=1e-5)


def test_corda_samples_need_a_corda_init(tmp_path):
    import yaml
    from slimtune.apps.train import RecipeError, load_recipe

    data = {
        "model": {"builtin": "tiny-llama"},
        "tasks": [{"name": "copy", "task": "copy"}],
        "stages": [
            {"name": "a", "data": [{"task": "copy"}], "steps": 1,
             "method": {"name": "lora", "r": 2, "alpha": 4}, "corda": {"rows": 4}}
        ],
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="needs method lora with init corda-kpm or corda-ipm"):
        load_recipe(path)


def test_offloaded_covariances_and_masked_padding():
    model = make_model("llama")
    batches = _batches(2, rows=2)
    here = covariances(model, batches, ["down_proj"])
    offloaded = covariances(model, batches, ["down_proj"], offload=True)
    for name in here:
        torch.testing.assert_close(offloaded[name], here[name], rtol=0, atol=0)
    # Padding (attention_mask 0) is not context: only the real tokens' inputs count.
    ids = make_batch(batch=2, seq=7)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    seen = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    masked = covariances(model, [{"input_ids": ids, "attention_mask": mask}], ["q_proj"])
    handle.remove()
    rows = [x[m.bool()] for x, m in zip(seen[0], mask, strict=True)]  # each row's real tokens,
    expected = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in rows) / 2  # scaled on its own
    torch.testing.assert_close(masked["model.layers.0.self_attn.q_proj"], expected)


def test_corda_samples_may_be_an_earlier_stage_s_data(tmp_path):
    import yaml
    from slimtune.apps.train import run

    stage = {"steps": 1, "batch_size": 4}
    data = {
        "seq_len": 32,
        "model": {"builtin": "tiny-llama"},
        "tasks": [{"name": "copy", "task": "copy", "n": 4}],
        "stages": [
            {"name": "a", "data": [{"task": "copy", "n": 32}], **stage},
            {"name": "b", "data": [{"task": "reverse", "n": 32}], **stage,
             "method": {"name": "lora", "r": 2, "alpha": 4, "init": "corda-kpm"},
             "corda": {"data": [{"stage": "a"}], "rows": 4}},
        ],
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    run(path, tmp_path / "run")
    saved = slimtune.files.read_tensors(
        tmp_path / "run" / "stages" / "02-b" / "slimtune" / "slimtune_model.safetensors"
    )
    assert any(key.endswith("corda_A") for key in saved[0])


@pytest.mark.timeout(120)  # the damping loop once never ended on a NaN covariance
@pytest.mark.parametrize(
    ("entry", "match"),
    [(float("nan"), "NaN or inf"), (float("inf"), "NaN or inf"), (0.0, "no positive variance")],
    ids=["nan", "inf", "zero"],
)
def test_a_covariance_no_decomposition_can_use_is_refused_by_module(entry, match):
    from test_refusals import refused

    model = make_model("llama")
    cov = covariances(model, _batches(2))
    name = "model.layers.1.mlp.down_proj"
    cov[name] = torch.full_like(cov[name], entry) if entry == 0.0 else cov[name].clone().fill_diagonal_(entry)
    config = slimtune.LoRAConfig(r=2, alpha=4, init="corda-ipm")
    refused(model, lambda: slimtune.corda.apply(model, config, cov), ValueError, rf"{match}.*module {name}")


def test_a_rank_above_a_module_s_is_refused_before_any_training(tmp_path, monkeypatch):
    """k_proj of the tiny model has 16 outputs: CorDA rank 20 cannot be taken from it. LoRA itself
    would take r=20, so only CorDA's own check catches it, before the covariances are collected."""
    import yaml
    from slimtune.apps.train import RecipeError, run

    model = make_model("llama")  # its k_proj: 32 x 64
    with pytest.raises(ValueError, match=r"rank 40 exceeds the rank of model\.layers\.0\.self_attn\.k_proj"):
        slimtune.corda.check(model, slimtune.LoRAConfig(r=40, alpha=80, init="corda-kpm"))
    data = {
        "model": {"builtin": "tiny-llama"},
        "tasks": [{"name": "copy", "task": "copy", "n": 4}],
        "stages": [
            {"name": "a", "data": [{"task": "copy", "n": 16}], "steps": 1, "batch_size": 4},
            {"name": "b", "data": [{"task": "copy", "n": 16}], "steps": 1, "batch_size": 4,
             "method": {"name": "lora", "r": 20, "alpha": 40, "init": "corda-kpm"}},
        ],
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(slimtune.corda, "covariances", lambda *a, **k: pytest.fail("collected covariances"))
    with pytest.raises(
        RecipeError, match=r"stages\[1\]\.method: lora cannot train this model: CorDA: rank 20"
    ):
        run(tmp_path / "r.yaml", tmp_path / "run")
    assert not (tmp_path / "run").exists()
