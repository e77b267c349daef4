"""Recipe operations are a registry: an operation added from outside the trainer (its function and
one registered class) is read, checked, run and recorded like the shipped ones, and its settings
are refused with the file, line and key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from slimtune.apps.train import RecipeError, load_recipe, run
from slimtune.apps.train.models import build
from slimtune.apps.train.operations import OPERATIONS, Operation, register
from slimtune.apps.train.schema import NUMBER, setting

RECIPE = """\
model: {{builtin: tiny-llama}}
tasks:
  - {{name: copy, task: copy, n: 4, stage: a}}
stages:
  - name: a
    data:
      - {{task: copy, n: 16}}
    steps: 2
    batch_size: 2
    lr: 1.0e-2
    post:
      - {operation}
"""


def shrink(model: torch.nn.Module, start: dict[str, torch.Tensor], factor: float) -> int:
    """The library function: every parameter moved back to start + factor * change."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(start[name] + factor * (parameter - start[name]))
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def shrink_operation():
    @dataclass(frozen=True)
    class Shrink(Operation):
        name = "shrink"
        post_only = "shrink scales the stage's change; it belongs in post"
        needs_start = True
        factor: float = setting(0.5, NUMBER, positive=True, at_most=1.0)
        where: str = ""

        def check(self, model, stage, recipe) -> None:
            if stage.method_name != "full":
                raise ValueError("shrink needs method full")

        def run(self, here, number: int) -> dict[str, Any]:
            return {"entries": shrink(here.prepared.model, here.start, self.factor)}

    register(Shrink)
    yield Shrink
    OPERATIONS.pop("shrink")


def _write(tmp_path, operation: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(operation=operation))
    return path


def test_a_registered_operation_runs_and_records(tmp_path, shrink_operation) -> None:
    result = run(_write(tmp_path, "{shrink: {factor: 1.0e-30}}"), tmp_path / "run")
    base = build(load_recipe(_write(tmp_path, "shrink")).model, seed=0)[0]
    # A change scaled to nothing leaves the stage's start: the model as built.
    for name, parameter in result.model.named_parameters():
        torch.testing.assert_close(parameter, base.get_parameter(name), rtol=0, atol=1e-12)
    record = json.loads((tmp_path / "run" / "stages" / "01-a" / "result.json").read_text())
    assert record["shrink"] == [{"entries": sum(p.numel() for p in base.parameters())}]


@pytest.mark.parametrize(
    "operation, match",
    [
        ("{shrink: {factor: 2}}", r":12: stages\[0\].post\[0\].shrink.factor: 2.0 is beyond"),
        (
            "{shrink: {facter: 0.5}}",
            r"stages\[0\].post\[0\].shrink.facter: unknown key 'facter'; did you mean 'factor'",
        ),
        ("{shrnk: {}}", r"stages\[0\].post\[0\]: unknown operation 'shrnk'; did you mean 'shrink'"),
    ],
)
def test_a_registered_operation_s_settings_are_refused_by_key(
    tmp_path, shrink_operation, operation, match
) -> None:
    with pytest.raises(RecipeError, match=match):
        load_recipe(_write(tmp_path, operation))


def test_a_registered_operation_is_checked_before_training(tmp_path, shrink_operation) -> None:
    text = _write(tmp_path, "shrink").read_text()
    (tmp_path / "recipe.yaml").write_text(
        text.replace("    steps: 2\n", "    steps: 2\n    method: {name: hft}\n")
    )
    with pytest.raises(RecipeError, match=r"stages\[0\].post\[0\].shrink: shrink needs method full"):
        run(tmp_path / "recipe.yaml", tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()


def test_a_post_only_operation_is_refused_in_pre(tmp_path, shrink_operation) -> None:
    text = _write(tmp_path, "shrink").read_text().replace("    post:\n", "    pre:\n")
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"pre\[0\]: shrink scales the stage's change; it belongs in post"):
        load_recipe(tmp_path / "recipe.yaml")


def test_an_operation_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="'lines' is empty or taken"):
        register(OPERATIONS["lines"])
