"""The quality benchmark's rehearsal patterns: the base's own chat replies mixed into each stage, kept
apart from the reply-drift set, each stage's steps raised so its task rows are seen as often, the
control that spends those steps on the task rows alone, and the ledger digest that covers the set only
for the runs that read it."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import slimtune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402
import quality_ledger  # noqa: E402
import quality_replies  # noqa: E402

needs_model = pytest.mark.skipif(
    not slimtune.models.is_available("smollm2-135m"),
    reason=f"needs the built-in model's tokenizer: {slimtune.models.INSTALL}",
)


@pytest.mark.parametrize("task_rows", [1, 7, 16, 32, 41])
@pytest.mark.parametrize("added", [0, 1, 13, 40])
@pytest.mark.parametrize("steps", [1, 16, 32])
def test_raised_steps_show_the_task_rows_as_often_as_without_rehearsal(task_rows, added, steps) -> None:
    raised = quality_replies.stage_steps(task_rows, added, steps)
    # passes over the mixed rows at least the passes over the task rows alone, by less than one step
    assert raised * task_rows >= steps * (task_rows + added) > (raised - 1) * task_rows
    assert added or raised == steps


def test_a_rehearsal_recipe_mixes_the_set_into_every_stage_with_its_own_steps() -> None:
    preset, steps = quality.PRESETS["cpu"], {"swap": 23, "facts": 30, "place": 22}
    for name in ("full+rehearsal", "paca+rehearsal", "s2ft+rehearsal"):
        spec = quality.recipe(quality.METHODS[name], 1e-4, 2, preset, steps)
        for stage in spec["stages"]:
            assert stage["data"] == [
                {"path": f"data/seed2/{stage['name']}-train.jsonl"},
                {"path": "data/rehearsal.jsonl"},
            ]
            own = steps[stage["name"]]
            assert (stage["steps"], stage["warmup_steps"]) == (own, own // 8)
    plain = quality.recipe(quality.METHODS["full"], 1e-4, 2, preset)
    assert [s["steps"] for s in plain["stages"]] == [preset.steps] * 3
    with pytest.raises(ValueError, match="paca\\+rehearsal: a rehearsal recipe needs each stage's steps"):
        quality.recipe(quality.METHODS["paca+rehearsal"], 1e-4, 2, preset)


def test_the_control_spends_the_same_steps_on_the_task_rows_alone() -> None:
    """`full+longer` differs from `full+rehearsal` only in the rehearsal set: the same steps, warmup
    and schedule in every stage, on its task's rows alone."""
    preset, steps = quality.PRESETS["cpu"], {"swap": 23, "facts": 30, "place": 22}
    control = quality.recipe(quality.METHODS["full+longer"], 1e-4, 2, preset, steps)
    rehearsal = quality.recipe(quality.METHODS["full+rehearsal"], 1e-4, 2, preset, steps)
    for own, mixed in zip(control["stages"], rehearsal["stages"], strict=True):
        assert own["data"] == [{"path": f"data/seed2/{own['name']}-train.jsonl"}]
        assert own == {**mixed, "data": own["data"]}
        assert own["steps"] == steps[own["name"]]
    with pytest.raises(ValueError, match="full\\+longer: a longer recipe needs each stage's steps"):
        quality.recipe(quality.METHODS["full+longer"], 1e-4, 2, preset)


class _WordTokenizer:
    """Words as tokens; a chat is its words and 10 template tokens."""

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())

    def encode_chat(self, messages) -> tuple[list[int], list[int]]:
        ids = [0] * (10 + sum(len(content.split()) for _, content in messages))
        return ids, ids


def _fake_greedy(answers: dict[str, str], calls: list[int]):
    def greedy(model, tok, batch, budget):
        calls.append(len(batch))
        return [answers[example.messages[0][1]] for example in batch]

    return greedy


def test_the_rehearsal_set_never_uses_a_drift_prompt_and_fits_one_row(monkeypatch) -> None:
    """Replies cut by the budget are dropped from both sets; the drift set is the first that end (only
    as many batches are generated as it needs); the rehearsal set takes the other prompts' replies
    whose chat fits `seq_len`."""
    import slimtune.apps.train.tasks as tasks

    prompts = [f"prompt {i}" for i in range(40)]
    budget = quality_replies.REPLY_TOKENS
    answers = {p: "word " * (budget if i % 5 == 0 else 30 + 3 * (i % 4)) for i, p in enumerate(prompts)}
    calls: list[int] = []
    monkeypatch.setattr(tasks, "greedy", _fake_greedy(answers, calls))
    monkeypatch.setattr(quality_replies.data, "read_jsonl", lambda name: [{"prompt": p} for p in prompts])
    drift = quality_replies.drift_set(None, _WordTokenizer(), None, 6)
    assert [c["messages"][0]["content"] for c in drift] == [f"prompt {i}" for i in (1, 2, 3, 4, 6, 7)]
    assert calls == [16]  # one batch held six ended replies
    rehearsal = quality_replies.rehearsal_set(None, _WordTokenizer(), drift, 40, seq_len=45)
    used = {c["messages"][0]["content"] for c in rehearsal}
    assert used and not used & {c["messages"][0]["content"] for c in drift}
    assert all(len(c["messages"][1]["content"].split()) + 10 <= 45 for c in rehearsal)
    expected = [i for i in range(8, 40) if i % 5 and 30 + 3 * (i % 4) + 10 <= 45]
    assert [c["messages"][0]["content"] for c in rehearsal] == [f"prompt {i}" for i in expected]


def _work_folder(tmp_path: Path) -> Path:
    out = tmp_path / "work"
    (out / "data" / "seed0").mkdir(parents=True)
    for name in ("probes", "text", "code", "replies", "replay"):
        (out / "data" / f"{name}.jsonl").write_text(json.dumps({"text": name}) + "\n")
    return out


def test_the_rehearsal_set_is_digested_only_for_the_runs_that_read_it(tmp_path) -> None:
    out = _work_folder(tmp_path)
    before = quality_ledger.data_digest(out, 0)
    (out / "data" / "rehearsal.jsonl").write_text(json.dumps(quality_replies.chat("q", "a")) + "\n")
    assert quality_ledger.data_digest(out, 0) == before  # every other run's records stay readable
    with_set = quality_ledger.data_digest(out, 0, ("rehearsal",))
    assert with_set != before
    (out / "data" / "rehearsal.jsonl").write_text(json.dumps(quality_replies.chat("q", "b")) + "\n")
    assert quality_ledger.data_digest(out, 0, ("rehearsal",)) != with_set


@needs_model
def test_each_stage_steps_come_from_the_rows_its_data_packs_into(tmp_path) -> None:
    """The search raises each stage's steps by the rehearsal set's rows over its task's rows, as the
    trainer packs them; the recipe it writes is one the trainer reads."""
    from slimtune.apps.train.data import pack, read_records
    from slimtune.apps.train.recipe import load_recipe

    out, preset = _work_folder(tmp_path), replace(quality.PRESETS["cpu"], methods=("full+rehearsal",))
    lengths = {"swap": 40, "facts": 100, "place": 300}  # examples: different numbers of rows
    for task, n in lengths.items():
        records = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(n)]
        quality.data.write_jsonl(out / "data" / "seed0" / f"{task}-train.jsonl", records)
        quality.data.write_jsonl(out / "data" / "seed0" / f"{task}-eval.jsonl", records[:4])
    chats = [quality_replies.chat(f"Say {i} in words.", f"It is {i}, said in words. " * 4) for i in range(9)]
    quality.data.write_jsonl(out / "data" / "rehearsal.jsonl", chats)
    search = quality.Search(out, preset, "cpu", 1, launch=False)
    steps = search.stage_steps(0)
    tok = quality._tokenizer()
    added = len(pack(read_records(out / "data" / "rehearsal.jsonl")[0], tok, preset.seq_len))
    assert added >= 3
    for task in lengths:
        rows = len(pack(read_records(out / "data" / "seed0" / f"{task}-train.jsonl")[0], tok, preset.seq_len))
        assert steps[task] == -(-preset.steps * (rows + added) // rows) > preset.steps
    assert len(set(steps.values())) == 3
    for method in ("full+rehearsal", "full+longer"):  # the control runs the same steps
        spec = search.recipe(quality.METHODS[method], 1e-4, 0)
        (out / "recipe.json").write_text(json.dumps(spec))
        stages = load_recipe(out / "recipe.json").stages
        assert [s.steps for s in stages] == [steps[t] for t in quality.NEW_TASKS]
