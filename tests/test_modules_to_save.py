"""`modules_to_save`: listed modules train in full beside any method, are saved and loaded by
slimtune.save/load, survive merge/unmerge, and go to and come from PEFT as PEFT saves them."""

from __future__ import annotations

import copy
import dataclasses
import json

import peft
import pytest
import slimtune
import torch
import transformers
from test_refusals import refused
from tiny_models import COMMON, make_batch, make_model

CONFIGS = {
    "paca": slimtune.PaCAConfig(r=4, modules_to_save=["lm_head"]),
    "s2ft": slimtune.S2FTConfig(heads=2, channels=8, modules_to_save=["lm_head"]),
    "lora": slimtune.LoRAConfig(r=4, alpha=8, modules_to_save=["lm_head"]),
    "hydra": slimtune.HydraConfig(r_parallel=4, r_sequential=2, alpha=8, modules_to_save=["lm_head"]),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _step(model, ids) -> None:
    optimizer = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_listed_modules_train_in_full_and_round_trip(method, tmp_path) -> None:
    model, ids = make_model("llama"), make_batch()
    base_head = model.lm_head.weight.detach().clone()
    slimtune.apply(model, CONFIGS[method])
    assert model.lm_head.weight.requires_grad
    assert any(p is model.lm_head.weight for p in slimtune.trainable_parameters(model))
    _step(model, ids)
    assert not torch.equal(model.lm_head.weight, base_head)  # it trained
    expected = _logits(model, ids)
    directory = slimtune.save(model, tmp_path / method)
    reloaded = slimtune.load(make_model("llama"), directory)
    assert torch.equal(_logits(reloaded, ids), expected)
    merged = slimtune.merge(model)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())  # the flags from before apply


def test_a_classification_head_trains_and_saves(tmp_path) -> None:
    config = transformers.LlamaConfig(**COMMON, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    ids, labels = make_batch(), torch.tensor([0, 1, 2])
    slimtune.apply(model, slimtune.LoRAConfig(r=4, alpha=8, modules_to_save=["score"]))
    optimizer = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=1e-2)
    before = model.score.weight.detach().clone()
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    assert not torch.equal(model.score.weight, before)
    directory = slimtune.save(model, tmp_path / "cls")
    torch.manual_seed(0)
    fresh = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            slimtune.load(fresh, directory)(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_unmerge_keeps_the_modules_trained_in_full() -> None:
    model, ids = make_model("llama"), make_batch()
    slimtune.apply(model, CONFIGS["lora"])
    _step(model, ids)
    expected = _logits(model, ids)
    slimtune.unmerge(slimtune.merge(model))
    assert model.lm_head.weight.requires_grad and torch.equal(_logits(model, ids), expected)


@pytest.mark.parametrize(
    "config, match",
    [
        (slimtune.LoRAConfig(r=4, alpha=8, modules_to_save=["q_proj"]), "overlaps the method's target"),
        (slimtune.PaCAConfig(r=4, modules_to_save=["layers.0"]), "overlaps the method's target"),
        (slimtune.PaCAConfig(r=4, modules_to_save=["classifier"]), "'classifier' matches no module"),
        (slimtune.PaCAConfig(r=4, modules_to_save=["rotary_emb"]), "no float parameters"),
    ],
)
def test_bad_modules_to_save_are_refused(config, match) -> None:
    model = make_model("llama")
    refused(model, lambda: slimtune.apply(model, config), ValueError, match)


def test_modules_to_save_must_be_a_list_of_names() -> None:
    with pytest.raises(TypeError, match="modules_to_save must be a list"):
        slimtune.PaCAConfig(r=4, modules_to_save="lm_head")


def test_a_checkpoint_without_the_saved_module_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = make_model("llama")
    slimtune.apply(model, CONFIGS["paca"])
    directory = slimtune.save(model, tmp_path / "paca")
    tensors = load_file(directory / "slimtune_model.safetensors")
    del tensors["modules_to_save.lm_head.weight"]
    save_file(tensors, directory / "slimtune_model.safetensors")
    fresh = make_model("llama")
    refused(fresh, lambda: slimtune.load(fresh, directory), ValueError, "modules_to_save.lm_head.weight")


def test_peft_round_trip_with_modules_to_save(tmp_path) -> None:
    base, ids = make_model("llama"), make_batch()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        init_lora_weights=False,
    )
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        ref.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ref.save_pretrained(tmp_path / "peft")
    ours = slimtune.load_peft(copy.deepcopy(base), tmp_path / "peft")
    assert ours.lm_head.weight.requires_grad
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids))
    slimtune.save(ours, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(_logits(back, ids), _logits(ref, ids))


def test_every_peft_lora_option_is_accounted_for() -> None:
    """A field PEFT adds is refused until classified: the audit covers every LoraConfig field."""
    from slimtune.peft_compat import INERT, READ

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unclassified = fields - set(READ) - INERT
    defaults = peft.LoraConfig().to_dict()
    from slimtune.peft_compat import _is_off

    # every remaining field is a feature slimtune lacks, off by default and refused when on
    assert all(_is_off(defaults.get(name)) for name in unclassified), sorted(
        n for n in unclassified if not _is_off(defaults.get(n))
    )


@pytest.mark.parametrize(
    "option",
    [
        {"rank_pattern": {"q_proj": 2}},
        {"alpha_pattern": {"q_proj": 2}},
        {"layers_to_transform": [0]},
        {"bias": "lora_only"},
        {"lora_bias": True},
        {"use_dora": True},
        {"trainable_token_indices": [1, 2]},
        {"a_future_peft_option": 3},
    ],
)
def test_peft_options_slimtune_lacks_are_refused_by_name(option, tmp_path) -> None:
    base = make_model("llama")
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **option}))
    key = next(iter(option))
    refused(base, lambda: slimtune.load_peft(base, tmp_path), ValueError, f"sets {key}=")


def test_re_saving_a_peft_adapter_keeps_its_fields(tmp_path) -> None:
    base, ids = make_model("llama"), make_batch()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True, init_lora_weights="gaussian"
    )
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ref.save_pretrained(tmp_path / "peft")
    ours = slimtune.load_peft(copy.deepcopy(base), tmp_path / "peft")
    slimtune.save(ours, tmp_path / "again", format="peft")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (
        written["use_rslora"] is True
        and written["lora_alpha"] == 8
        and written["init_lora_weights"] == "gaussian"
    )
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(_logits(back, ids), _logits(ref, ids))
