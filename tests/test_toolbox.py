"""The toolbox from an HF Trainer loop: HFT freezes exactly its selection (the rest stays bit for bit),
and LiNeS scales each parameter's change by its depth factor afterwards."""

from __future__ import annotations

import slimtune
import torch
import transformers
from test_hf_trainer import Rows
from tiny_models import make_model


def test_hft_then_lines_around_an_hf_trainer_run(tmp_path) -> None:
    model = make_model("llama").train()
    start = slimtune.toolbox.lines.snapshot(model)
    trained = slimtune.toolbox.hft.freeze(model, seed=3)
    selected = slimtune.toolbox.hft.select(model, seed=3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == selected
    assert len(trained) == len(selected) < len(start)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=Rows()).train()
    tuned = slimtune.toolbox.lines.snapshot(model)
    for name, value in tuned.items():
        assert torch.equal(value, start[name]) == (name not in selected), name  # frozen: untouched
    slimtune.toolbox.lines.scale(model, start, alpha=0.4, beta=0.6)
    factors = slimtune.toolbox.lines.scales(model, alpha=0.4, beta=0.6)
    assert factors["model.layers.0.self_attn.q_proj.weight"] == 0.4
    assert factors["model.layers.1.self_attn.q_proj.weight"] == 1.0 and factors["lm_head.weight"] == 0.4
    for name, parameter in model.named_parameters():
        expected = start[name] + factors[name] * (tuned[name] - start[name])
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=0, msg=name)
