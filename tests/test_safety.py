"""First pieces of "safe by construction": new layers take the model's training mode, a patched
model's `save_pretrained` (what `Trainer.save_model` calls) writes a slimtune checkpoint, and in-place
methods refuse tied weights. Each refusal leaves the model as it was."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import slimtune
import torch
from slimtune.layers import LoRALinear
from test_refusals import refused
from tiny_models import make_batch, make_model


@pytest.mark.parametrize("training", [False, True])
def test_new_layers_take_the_training_mode_of_what_they_replace(training: bool) -> None:
    model = make_model("llama").train(training)
    slimtune.apply(model, slimtune.LoRAConfig(r=4, alpha=8, dropout=0.3))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(layer.training == training for layer in layers)
    if not training:  # dropout must not run at inference: two greedy generations agree
        with torch.no_grad():
            for layer in layers:
                layer.lora_B.normal_()
        prompt = make_batch(batch=1, seq=4)
        first = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(first, model.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("config", [slimtune.PaCAConfig(r=4), slimtune.LoRAConfig(r=4, alpha=8)])
def test_save_pretrained_of_a_patched_model_writes_a_slimtune_checkpoint(config, tmp_path) -> None:
    """What `Trainer.save_model` calls writes the trained tensors only, which transformers cannot take
    for a model (no config.json) and slimtune.load puts back onto the base; after merge it is the
    class's own save_pretrained again."""
    base = make_model("llama")
    model = slimtune.apply(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in slimtune.trainable_parameters(model):
            p.add_(0.1)
    model.save_pretrained(tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "slimtune_config.json", "slimtune_model.safetensors", "model.safetensors"
    }  # fmt: skip
    ids = make_batch()
    reloaded = slimtune.load(copy.deepcopy(base), tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )
    merged = slimtune.merge(model)
    merged.save_pretrained(tmp_path / "merged")  # the class's own method again
    plain = type(merged).from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, merged(input_ids=ids).logits)


@pytest.mark.parametrize("config", [slimtune.PaCAConfig(r=4, target_modules=["lm_head"])])
def test_in_place_methods_refuse_a_tied_lm_head(config) -> None:
    model = make_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    refused(model, lambda: slimtune.apply(model, config), ValueError, r"'lm_head' shares its weight.*tied")


def test_lora_on_a_tied_lm_head_is_allowed() -> None:
    model = make_model("llama", tie_word_embeddings=True)
    slimtune.apply(model, slimtune.LoRAConfig(r=4, alpha=8, target_modules=["lm_head", "q_proj"]))
    ids = make_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.lora_B.grad is not None


def test_adapter_layers_refuse_another_input_dtype_like_nn_linear() -> None:
    model = make_model("llama", dtype=torch.bfloat16)
    slimtune.apply(model, slimtune.LoRAConfig(r=4, alpha=8))
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 3, layer.in_features)  # float32 into a bfloat16 layer
    with pytest.raises(RuntimeError, match=r"input of a LoRALinear to have dtype torch\.bfloat16"):
        layer(x)
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, layer.weight)  # what nn.Linear does
    mlp = model.model.layers[0].mlp  # the fused gated-MLP path refuses it alike
    with pytest.raises(RuntimeError, match=r"input of a LoRALinear to have dtype torch\.bfloat16"):
        mlp(torch.randn(2, 3, mlp.gate_proj.in_features))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast: the input is cast, as for nn.Linear


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay"])
def test_partial_adamw_refuses_hyperparameters_torch_refuses(name: str, value: float) -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=f"PartialAdamW {name}"):
        slimtune.PartialAdamW(params, **{name: value})


@pytest.mark.parametrize("name", ["train_v_rows", "train_gate_up_rows"])
def test_s2ft_config_bools_are_bools(name: str) -> None:
    with pytest.raises(TypeError, match=f"S2FTConfig.{name} must be True or False"):
        slimtune.S2FTConfig(heads=1, channels=1, **{name: "yes"})


def _saved_paca(tmp_path):
    model = make_model("llama")
    slimtune.apply(model, slimtune.PaCAConfig(r=4))
    return slimtune.save(model, tmp_path / "ckpt")


def test_checkpoint_json_missing_keys_or_garbage_is_named(tmp_path) -> None:
    directory = _saved_paca(tmp_path)
    path = directory / "slimtune_config.json"
    meta = json.loads(path.read_text())
    for broken, match in [
        ({k: v for k, v in meta.items() if k != "modules"}, r"lacks \['modules'\]"),
        ({**meta, "config": "paca"}, r"lacks \['config'\]"),
    ]:
        path.write_text(json.dumps(broken))
        fresh = make_model("llama")
        refused(fresh, lambda fresh=fresh: slimtune.load(fresh, directory), ValueError, match)
    path.write_bytes(b"\xff\xfe not json")
    fresh = make_model("llama")
    refused(fresh, lambda: slimtune.load(fresh, directory), ValueError, "not valid JSON")


def test_checkpoint_of_another_model_class_is_refused_unless_allowed(tmp_path) -> None:
    directory = _saved_paca(tmp_path)
    other = make_model("mistral")  # same sizes, another family
    refused(other, lambda: slimtune.load(other, directory), ValueError, "saved from a LlamaForCausalLM")
    with pytest.warns(UserWarning, match="loading anyway"):
        slimtune.load(other, directory, allow_other_class=True)


def test_sparse_delta_validates_every_entry_before_the_first_write() -> None:
    from slimtune.sparse_delta import DeltaEntry, SparseDelta

    model = make_model("llama")
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight
    before = weight.detach().clone()
    good = DeltaEntry(1, torch.tensor([0, 1]), torch.ones(weight.shape[0], 2, dtype=torch.float64))
    for index, error, match in [
        (torch.tensor([0, -1]), ValueError, "index value -1 is out of range"),
        (torch.tensor([3, 3]), ValueError, "holds a value twice"),
        (torch.tensor([0.0, 1.0]), TypeError, "1-D int64"),
    ]:
        bad = DeltaEntry(1, index, torch.ones(weight.shape[0], 2, dtype=torch.float64))
        delta = SparseDelta({"model.layers.1.mlp.down_proj.weight": good, f"{name}.weight": bad})
        with pytest.raises(error, match=match):
            delta.apply(model)
        untouched = make_model("llama").model.layers[1].mlp.down_proj.weight
        assert torch.equal(model.model.layers[1].mlp.down_proj.weight, untouched)
        assert torch.equal(weight, before)


def test_scattered_entry_diffs_validate_every_entry_before_the_first_write() -> None:
    from slimtune.sparse_delta import ENTRIES, DeltaEntry, SparseDelta

    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = DeltaEntry(ENTRIES, torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64))
    twos = torch.ones(2, dtype=torch.float64)
    for entry, error, match in [
        (DeltaEntry(ENTRIES, torch.tensor([0, -1]), twos), ValueError, "index value -1 is out"),
        (DeltaEntry(ENTRIES, torch.tensor([4, 4]), twos), ValueError, "holds a value twice"),
        (DeltaEntry(ENTRIES, torch.tensor([0, 1, 2]), twos), ValueError, "belongs to another model"),
        (DeltaEntry(1, torch.tensor([0, 1]), twos), ValueError, "rows or columns of a 1-D parameter"),
        (DeltaEntry(2, torch.tensor([0, 1]), twos), ValueError, "has axis 2"),
    ]:
        diff = SparseDelta({"model.layers.0.mlp.up_proj.weight": good, "model.norm.weight": entry})
        with pytest.raises(error, match=match):
            diff.apply(model)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "loftq", "eva"])
def test_peft_adapters_whose_init_rewrites_the_base_are_refused(init: str, tmp_path) -> None:
    model = make_model("llama")
    slimtune.apply(model, slimtune.LoRAConfig(r=4, alpha=8))
    directory = slimtune.save(model, tmp_path / "peft", format="peft")
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    fresh = make_model("llama")
    refused(fresh, lambda: slimtune.load_peft(fresh, directory), ValueError, f"init_lora_weights='{init}'")


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch) -> None:
    """A write that dies half-way leaves the previous checkpoint whole and no stray file behind."""
    import slimtune.files

    model = make_model("llama")
    slimtune.apply(model, slimtune.PaCAConfig(r=4))
    directory = slimtune.save(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert set(before) == {"slimtune_config.json", "slimtune_model.safetensors"}

    def dies(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(slimtune.files, "save_file", dies)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.paca_columns.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        slimtune.save(model, directory)
    after = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert after == before
    fresh = make_model("llama")
    slimtune.load(fresh, directory)  # the old checkpoint still loads


def test_a_tensor_file_larger_than_any_checkpoint_of_the_model_is_refused_unread(
    tmp_path, monkeypatch
) -> None:
    from safetensors.torch import load_file, save_file

    model = make_model("llama")
    slimtune.apply(model, slimtune.PaCAConfig(r=4))
    directory = slimtune.save(model, tmp_path / "ckpt")
    tensors = load_file(directory / "slimtune_model.safetensors")
    weights = sum(p.numel() for p in make_model("llama").parameters())
    tensors["junk"] = torch.zeros(10 * weights)  # 10x the model's float32 bytes, declared and present
    save_file(tensors, directory / "slimtune_model.safetensors")
    monkeypatch.setattr(slimtune.files, "safe_open", lambda *a, **k: pytest.fail("the file was opened"))
    fresh = make_model("llama")
    refused(
        fresh, lambda: slimtune.load(fresh, directory), ValueError, r"more than any checkpoint of this model"
    )


def test_non_finite_saved_values_load_with_a_warning_naming_them(tmp_path) -> None:
    model = make_model("llama")
    slimtune.apply(model, slimtune.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B[0, 0] = float("nan")
    for format in ("slimtune", "peft"):
        directory = slimtune.save(model, tmp_path / format, format=format)
        load = slimtune.load if format == "slimtune" else slimtune.load_peft
        with pytest.warns(UserWarning, match=r"1 tensor\(s\) hold NaN or inf values \(.*q_proj\.lora_B"):
            load(make_model("llama"), directory)
