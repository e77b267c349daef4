"""First pieces of "safe by construction": new layers take the model's training mode, a patched
model refuses `save_pretrained` (what `Trainer.save_model` calls) with the way out, and in-place
methods refuse tied weights. Each refusal leaves the model as it was."""

from __future__ import annotations

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
def test_save_pretrained_of_a_patched_model_is_refused_and_works_after_merge(config, tmp_path) -> None:
    model = make_model("llama")
    slimtune.apply(model, config)
    with pytest.raises(ValueError, match=r"slimtune\.save\(model, dir\).*slimtune\.merge\(model\)"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    ids = make_batch()
    merged = slimtune.merge(model)
    merged.save_pretrained(tmp_path / "hf")  # the class's own method again
    reloaded = type(merged).from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


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
