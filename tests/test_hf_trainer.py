"""Patched models inside the trainers people use: HF Trainer (and TRL's SFTTrainer, built on it) save
checkpoints at `save_steps` and `save_model`, resume from them onto a freshly patched model with the
same result as an uninterrupted run, and refuse a checkpoint of another config; QPaCA and QLoRA on
4-bit bases too."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import slimtune
import torch
import transformers
from test_refusals import refused
from tiny_models import make_batch, make_model
from torch.utils.data import Dataset

CONFIGS = {
    "paca": slimtune.PaCAConfig(r=4),
    "s2ft": slimtune.S2FTConfig(heads=1, channels=8),
    "lora": slimtune.LoRAConfig(r=4, alpha=8),
    "hydra": slimtune.HydraConfig(2, 2, alpha=4),
}


class Rows(Dataset):
    """Causal-LM rows of random tokens (labels = inputs)."""

    def __init__(self, rows: int = 16, seq: int = 12) -> None:
        self.ids = make_batch(batch=rows, seq=seq, seed=7)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def patched(method: str, lean: bool = False, config: slimtune.MethodConfig | None = None) -> torch.nn.Module:
    model = slimtune.apply(make_model("llama").train(), config or CONFIGS[method])
    return slimtune.lean(model) if lean else model


def trainer(model: torch.nn.Module, out: Path, steps: int = 4, **kw) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, seed=3, **kw,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=Rows())


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=make_batch(batch=2, seq=9, seed=11)).logits


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
@pytest.mark.parametrize("method", CONFIGS)
def test_trainer_checkpoints_and_a_resumed_run_ends_where_the_whole_run_does(
    method: str, lean: bool, tmp_path: Path
) -> None:
    whole = patched(method, lean)
    trainer(whole, tmp_path / "whole").train()
    middle = tmp_path / "whole" / "checkpoint-2"
    assert {"model.safetensors", "slimtune_config.json", "slimtune_model.safetensors", "optimizer.pt"} <= {
        p.name for p in middle.iterdir()
    }
    resumed = patched(method, lean)
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(middle))
    expected, got = weights(whole), weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert torch.equal(logits(whole), logits(resumed))


def test_save_model_is_small_and_loads_back_with_slimtune_load(tmp_path: Path) -> None:
    model = patched("paca")
    run = trainer(model, tmp_path / "run", steps=2, save_strategy="no")
    run.train()
    run.save_model(str(tmp_path / "final"))
    saved = slimtune.files.read_tensors(tmp_path / "final" / "model.safetensors")[0]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == trained + 32  # the trained columns and the digest
    assert not (tmp_path / "final" / "config.json").exists()  # from_pretrained cannot take it for a model
    with pytest.raises((OSError, ValueError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    reloaded = slimtune.load(make_model("llama"), tmp_path / "final")
    assert torch.equal(logits(reloaded), logits(model))


def test_resume_onto_another_config_is_refused_before_loading(tmp_path: Path) -> None:
    trainer(patched("paca"), tmp_path / "run", steps=2).train()
    other = patched("paca", config=slimtune.PaCAConfig(r=4, seed=1))  # other columns, same shapes
    run = trainer(other, tmp_path / "other")
    refused(other, lambda: run.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")),
            ValueError, r"another slimtune config.*slimtune_config\.json")  # fmt: skip
    state = slimtune.files.read_tensors(tmp_path / "run" / "checkpoint-2" / "model.safetensors")[0]
    refused(other, lambda: other.load_state_dict(state, strict=False), ValueError, "another slimtune config")


def test_a_merged_model_saves_and_loads_as_plain_transformers_again(tmp_path: Path) -> None:
    model = patched("lora")
    trainer(model, tmp_path / "run", steps=2, save_strategy="no").train()
    merged = slimtune.merge(copy.deepcopy(model))
    merged.save_pretrained(tmp_path / "hf")  # the class's own method again
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)
    assert merged._keys_to_ignore_on_save is None and not merged._load_state_dict_pre_hooks
    assert len(model._load_state_dict_pre_hooks) == 1  # the copy took its own hook back, not the original's
    model.save_pretrained(tmp_path / "still-patched")  # and the original still saves itself
    assert (tmp_path / "still-patched" / "slimtune_config.json").is_file()


@pytest.mark.parametrize("method", CONFIGS)
def test_trainable_summary_counts_each_entry_once(method: str, capsys) -> None:
    base = make_model("llama")
    model = patched(method)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = slimtune.trainable_summary(model)
    adapters = trained if method in ("lora", "hydra") else 0  # in-place entries are the base's own
    assert summary == {"trainable": trained, "all": base.num_parameters() + adapters,
                       "percent": 100 * trained / (base.num_parameters() + adapters)}  # fmt: skip
    assert model.num_parameters() == summary["all"]
    assert model.num_parameters(only_trainable=True) == trained
    slimtune.print_trainable_summary(model)
    assert capsys.readouterr().out == (
        f"trainable params: {trained:,d} || all params: {summary['all']:,d} || "
        f"trainable%: {summary['percent']:.4f}\n"
    )
    assert slimtune.merge(model).num_parameters() == base.num_parameters()


@pytest.mark.skipif(
    not slimtune.models.is_available("smollm2-135m"), reason="needs the built-in model's tokenizer"
)
@pytest.mark.parametrize("method", CONFIGS)
def test_trl_sft_trainer_with_its_defaults_checkpoints_and_resumes(method: str, tmp_path: Path) -> None:
    """TRL's SFTTrainer turns on bf16 autocast and gradient checkpointing by default; a run resumed from
    its middle checkpoint ends where the whole run does (accelerate's autocast wrapper removed first)."""
    import datasets
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(slimtune.models.path("smollm2-135m"))
    turns = [(f"add {i} and {i + 1}", str(2 * i + 1)) for i in range(16)]
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in turns]
    data = datasets.Dataset.from_dict({"messages": chats})

    def run(out: str, resume: str | None = None) -> torch.nn.Module:
        model = slimtune.apply(make_model("llama", vocab_size=len(tokenizer)).train(), CONFIGS[method])
        args = trl.SFTConfig(
            output_dir=str(tmp_path / out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
            learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=3,
        )  # fmt: skip
        assert args.bf16 and args.gradient_checkpointing  # TRL's defaults
        sft = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        sft.train(resume_from_checkpoint=resume)
        return sft.accelerator.unwrap_model(sft.model, keep_fp32_wrapper=False)

    whole = run("whole")
    resumed = run("resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    expected, got = weights(whole), weights(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(resumed), logits(whole), rtol=1e-5, atol=1e-5)
    merged = slimtune.merge(copy.deepcopy(resumed))
    torch.testing.assert_close(logits(merged), logits(resumed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", CONFIGS)
def test_accelerate_save_state_and_load_state_resume_a_bf16_loop_exactly(method: str, tmp_path: Path) -> None:
    """A plain accelerate loop (bf16 autocast): `save_state` after 2 of 4 steps, `load_state` onto a
    freshly patched model, 2 more steps: the weights the uninterrupted loop ends with."""
    import accelerate

    batches = [{"input_ids": b, "labels": b} for b in make_batch(batch=16, seq=12, seed=7).split(4)]

    def loop(steps: range, save: Path | None = None, load: Path | None = None) -> torch.nn.Module:
        accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        model = patched(method)
        params = [p for p in model.parameters() if p.requires_grad]
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(params, lr=1e-2))
        if load is not None:
            accelerator.load_state(str(load))
        for step in steps:
            accelerator.backward(model(**batches[step]).loss)
            optimizer.step()
            optimizer.zero_grad()
            if save is not None and step == 1:
                accelerator.save_state(str(save))
        return accelerator.unwrap_model(model, keep_fp32_wrapper=False)

    whole = loop(range(4), save=tmp_path / "state")
    resumed = loop(range(2, 4), load=tmp_path / "state")
    expected, got = weights(whole), weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(logits(resumed), logits(whole))


@pytest.mark.parametrize("fmt", ["bnb-nf4", "torchao-nf4"])
@pytest.mark.parametrize("method", ["paca", "lora"], ids=["qpaca", "qlora"])
def test_a_4bit_base_checkpoints_and_resumes_in_trainer(method: str, fmt: str, tmp_path: Path, monkeypatch):
    """QPaCA and QLoRA under Trainer: the checkpoint holds the trained tensors (the 4-bit weights stay
    the base's), a resumed run ends where the whole run does, and resuming warns of no missing key."""
    from quantize import quantize

    def fresh() -> torch.nn.Module:
        return slimtune.apply(quantize(make_model("llama").train(), fmt), CONFIGS[method])

    whole = fresh()
    trainer(whole, tmp_path / "whole").train()
    middle = tmp_path / "whole" / "checkpoint-2"
    resumed = fresh()
    warned: list[str] = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda text, *_, **__: warned.append(text))
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(middle))
    assert not [m for m in warned if "missing keys" in m], warned
    expected = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    ids = make_batch(batch=2, seq=9, seed=11)
    with torch.no_grad():  # in train mode: bitsandbytes repacks for its CPU inference kernel in eval
        assert torch.equal(whole.train()(input_ids=ids).logits, resumed.train()(input_ids=ids).logits)
