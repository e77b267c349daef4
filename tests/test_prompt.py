"""Soft prompts: the prompted forward equals the model on [prompt; input] embeddings, cached decoding
equals recomputation, only the prompt trains, save/load round-trips and refuses other models."""

from __future__ import annotations

import copy

import pytest
import slimtune
import torch
from slimtune.apps.train.tasks import Example, greedy
from slimtune.prompt import attach, attached, detach, load, make, save, using
from tiny_models import make_batch, make_model


def _reference(model, prompt, ids, mask=None):
    """The plain model on the prompt's embeddings followed by the input's, prompt positions cut; a
    padded row's tokens placed right after the prompt (positions counted over the mask), as alone."""
    embeds = model.get_input_embeddings()(ids)
    full = torch.cat([prompt.weight.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
    positions = None
    if mask is not None:
        mask = torch.cat([torch.ones(ids.shape[0], prompt.tokens, dtype=mask.dtype), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(inputs_embeds=full, attention_mask=mask, position_ids=positions).logits[:, prompt.tokens :]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_prompted_logits_and_loss_equal_the_concatenated_input(family):
    model = make_model(family)
    ids = make_batch()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    prompt = make(model, 5, seed=1)
    expected = _reference(model, prompt, ids, mask)
    attach(model, prompt)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, expected)
    alone = model(input_ids=ids[:1, 3:]).logits  # the padded row without its padding
    torch.testing.assert_close(out.logits[:1, 3:], alone, rtol=1e-5, atol=1e-5)
    plain_loss = torch.nn.functional.cross_entropy(
        expected[:, :-1].reshape(-1, expected.shape[-1]), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, plain_loss)
    assert attached(model) is prompt and all(p is not prompt.weight for p in model.parameters())


class _Tok:
    pad_id, eos_id, bos_id = 0, 96, None

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_cached_greedy_decoding_equals_recomputation():
    model = make_model("llama")
    attach(model, make(model, 4, seed=2))
    batch = [Example("1 2 3 4 5", "1 1 1 1"), Example("7 8", "2 2 2 2")]
    replies = greedy(model, _Tok(), batch, max_new_tokens=4)
    for example, reply in zip(batch, replies, strict=True):
        ids = _Tok().encode(example.prompt)
        for _ in range(4):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert reply == " ".join(map(str, ids[len(_Tok().encode(example.prompt)) :]))
    generated = model.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=4, do_sample=False)
    assert " ".join(map(str, generated[0, 5:].tolist())) == replies[0]


def test_greedy_decoding_keeps_no_autograd_graph():
    """Called outside `evaluate` too (the quality benchmark's base replies): a graph kept through the
    cache grew with every new token until a 160-token batch ran a 23 GB machine out of memory."""
    model = make_model("llama")
    grad_enabled = []
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    greedy(model, _Tok(), [Example("1 2 3", "1 1")], max_new_tokens=3)
    assert grad_enabled and not any(grad_enabled)


@pytest.mark.parametrize("seed", range(4))
def test_generate_logits_at_every_cached_step_equal_recomputation(seed):
    """`generate` reads the key/value cache after its first step (under the keyword of the installed
    transformers: `cache` from 5.25, `past_key_values` before); a cached step once counted as a first
    one and prepended the prompt again (logits off by 0.05-0.12, the argmax often unchanged)."""
    model = make_model("llama")
    attach(model, make(model, 4, seed=seed))
    ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 7, 8, 9]])
    mask = (ids != 0).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)  # fmt: skip
    for step, logits in enumerate(out.logits):
        for row in range(2):  # each row alone, without padding, recomputed from scratch
            start = int((mask[row] == 0).sum())
            with torch.no_grad():
                expected = model(input_ids=out.sequences[row : row + 1, start : 5 + step]).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-5)


def test_only_the_prompt_trains_and_detach_restores_the_model():
    model = make_model("llama")
    before = copy.deepcopy(model)
    ids = make_batch()
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = attach(model, make(model, 3))
    model(input_ids=ids, labels=ids).loss.backward()
    assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0
    assert detach(model) is prompt and attached(model) is None and "forward" not in model.__dict__
    torch.testing.assert_close(model(input_ids=ids).logits, before(input_ids=ids).logits, rtol=0, atol=0)
    with using(model, prompt):
        assert attached(model) is prompt
    assert attached(model) is None


def test_save_and_load_round_trip_and_refuse_other_models(tmp_path):
    model = make_model("llama")
    ids = make_batch()
    prompt = attach(model, make(model, 6, seed=3))
    with torch.no_grad():
        prompt.weight.add_(0.1)
    save(model, tmp_path / "prompt.safetensors")
    other = make_model("llama")
    load(other, tmp_path / "prompt.safetensors")
    torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    wide = make_model("llama", hidden_size=32, intermediate_size=40)
    with pytest.raises(ValueError, match="width"):
        load(wide, tmp_path / "prompt.safetensors")
    assert attached(wide) is None
    with pytest.raises(ValueError, match="model_class"):
        load(make_model("qwen2"), tmp_path / "prompt.safetensors")
    with pytest.raises(ValueError, match="already"):
        load(other, tmp_path / "prompt.safetensors")
    with pytest.raises(ValueError, match="1 to 4096"):
        make(model, 0)
    assert slimtune.prompt.attached(copy.deepcopy(model)) is not None  # copies keep their prompt


def _promot(tmp_path, extra_stage=None):
    import yaml

    stage = {"steps": 3, "batch_size": 4}
    data = {
        "seed": 1,
        "seq_len": 32,
        "model": {"builtin": "tiny-llama"},
        "tasks": [
            {"name": "copy", "task": "copy", "n": 4, "stage": "copy", "prompt": "copy-prompt"},
            {"name": "bare", "task": "copy", "n": 4, "prompt": "without"},
        ],
        "stages": [
            {"name": "copy-prompt", "data": [{"task": "copy", "n": 32}],
             "method": {"name": "prompt", "tokens": 4}, "lr": 0.1, **stage},
            {"name": "copy", "data": [{"task": "copy", "n": 32}], "lr": 1e-2, **stage},
        ],
    }  # fmt: skip
    if extra_stage:
        data["stages"].append(extra_stage)
    path = tmp_path / "promot.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_promot_stages_train_the_prompt_then_the_model(tmp_path):
    import json

    from slimtune.apps.train import load_recipe, models, run

    path = _promot(tmp_path)
    result = run(path, tmp_path / "run")
    folder = tmp_path / "run" / "stages"
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    base = json.loads((tmp_path / "run" / "base.json").read_text())
    # Stage 1 changed no weight of the model: without the prompt it scores exactly as the base.
    assert report["loss"][0][1] == base["bare"]["loss"]
    assert report["loss"][0][0] != base["copy"]["loss"]  # with it, it does not
    first = json.loads((folder / "01-copy-prompt" / "result.json").read_text())
    assert len(first["losses"]) == 3 and first["losses"][-1] < first["losses"][0]
    # Stage 2 trained every weight of the model, with the prompt attached and frozen.
    recipe = load_recipe(path)
    fresh, _ = models.build(recipe.model, recipe.seed)
    trained = slimtune.files.read_tensors(folder / "02-copy" / "trained.safetensors")[0]
    assert set(trained) == {name for name, _ in fresh.named_parameters()}
    saved = slimtune.files.read_tensors(folder / "01-copy-prompt" / "prompt.safetensors")[0]["prompt"]
    torch.testing.assert_close(attached(result.model).weight, saved, rtol=0, atol=0)


def test_a_branch_from_the_base_has_no_prompt(tmp_path):
    from slimtune.apps.train import run

    fresh = {
        "name": "fresh",
        "from": "base",
        "data": [{"task": "copy", "n": 32}],
        "steps": 1,
        "batch_size": 4,
    }
    assert attached(run(_promot(tmp_path, fresh), tmp_path / "run").model) is None


def test_promot_resume_equals_the_whole_run(tmp_path):
    import json
    import shutil

    from slimtune.apps.train import run

    path = _promot(tmp_path)
    run(path, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    (tmp_path / "part" / "stages" / "02-copy" / "result.json").unlink()
    (tmp_path / "part" / "metrics.json").unlink()
    run(path, tmp_path / "part", resume=True)
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    part = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert part["accuracy"] == whole["accuracy"] and part["loss"] == whole["loss"]


def test_a_task_prompt_must_name_a_prompt_stage(tmp_path):
    import yaml
    from slimtune.apps.train import RecipeError, load_recipe

    path = _promot(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["tasks"][0]["prompt"] = "copy"  # a stage, but not of method prompt
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="neither 'without' nor a stage of method prompt"):
        load_recipe(path)


def test_a_cached_step_reads_the_cache_under_either_keyword():
    """transformers 5.25 renamed `past_key_values` to `cache` (the old name still accepted): a cached
    step is recognised under both, so its logits equal recomputation over the whole sequence."""
    import inspect

    model = make_model("llama")
    attach(model, make(model, 4, seed=2))
    ids = make_batch(batch=2, seq=6)
    names = ["past_key_values"] + (
        ["cache"] if "cache" in inspect.signature(type(model).forward).parameters else []
    )
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1]
        for name in names:
            out = model(input_ids=ids[:, :-1], use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            step = model(input_ids=ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-5, msg=name)


def test_greedy_decoding_uses_the_current_cache_keyword():
    """No deprecation notice from transformers during evaluation (the cache keyword of this release)."""
    import logging

    import transformers

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    root = transformers.logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        greedy(make_model("llama"), _Tok(), [Example("1 2 3", "1 1")], max_new_tokens=3)
    finally:
        root.removeHandler(handler)
    assert not [r for r in records if "deprecated" in r.getMessage()], [r.getMessage() for r in records]
