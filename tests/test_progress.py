"""Progress of the long phases: in place on a terminal, short lines off one (a log, CI)."""

from __future__ import annotations

import pytest
import slimtune
import yaml
from slimtune.apps import progress
from slimtune.apps.train import models, run


def test_off_a_terminal_a_counted_phase_prints_its_tenths_only_once_it_is_slow(capsys, monkeypatch) -> None:
    clock = iter([0.0, 1.0, 2.0, 30.0, 31.0, 32.0, 33.0])  # start, then one reading per update
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.bar(4, "evaluating swap", quiet_s=10.0)
    for _ in range(3):
        bar.update()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["evaluating swap: 3/4 (30.0 s)"]  # quiet for 10 s; then the next tenth shows
    bar.update()
    assert capsys.readouterr().err == "evaluating swap: 4/4 (31.0 s)\n"  # the last update always shows


def test_off_a_terminal_a_slow_phase_prints_at_least_every_30_seconds(capsys, monkeypatch) -> None:
    """A phase of 1000 items at 4 s each (a base evaluation on a loaded machine): a tenth takes 400 s,
    so it also prints at the first update 30 s after its last line."""
    clock = iter([0.0, *(4.0 * step for step in range(1, 21))])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.bar(1000, "evaluating knowledge", quiet_s=10.0)
    for _ in range(20):
        bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"evaluating knowledge: {n}/1000 ({4.0 * n:.1f} s)" for n in (8, 16)]


def test_an_uncounted_phase_says_what_it_does_and_how_long_it_took(capsys, monkeypatch) -> None:
    with progress.phase("loading smollm2-135m"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0] == "loading smollm2-135m ..."
    assert err.splitlines()[1].startswith("loading smollm2-135m: ") and err.endswith(" s\n")
    monkeypatch.setattr(progress, "interactive", lambda: True)
    with pytest.raises(KeyError), progress.phase("converting"):
        raise KeyError
    err = capsys.readouterr().err  # on a terminal: one line, rewritten in place; a failure says so
    assert err.startswith("converting ...\rconverting: failed after ") and err.count("\n") == 1


def test_later_processes_of_a_launch_show_no_progress(capsys, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    with progress.phase("loading"):
        bar = progress.bar(2, "steps")
        bar.update(2)
    assert capsys.readouterr().err == ""


def test_a_run_prints_its_folder_first_and_a_line_per_evaluation_off_a_terminal(tmp_path, capfd) -> None:
    recipe = {
        "model": {"builtin": "tiny-llama"},
        "tasks": [{"name": "copy", "task": "copy", "n": 4}, {"name": "reverse", "task": "reverse", "n": 4}],
        "stages": [{"name": "a", "data": [{"task": "copy", "n": 16}], "steps": 2, "batch_size": 4}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run(tmp_path / "r.yaml", tmp_path / "run")
    err = capfd.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[0] == f"slimtune train: {tmp_path / 'r.yaml'} -> run folder {tmp_path / 'run'}"
    for task in ("copy", "reverse"):  # the base evaluation and the stage's
        assert err.count(f"evaluating {task}: 4/4 (") == 2, err


def test_building_a_builtin_model_for_the_first_time_says_it_converts(capsys, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(slimtune.models, "BUILTINS", {"fake": None})
    monkeypatch.setattr(slimtune.models, "is_built", lambda name: False)
    monkeypatch.setattr(
        slimtune.models, "path", lambda name: calls.append(name) or (_ for _ in ()).throw(OSError)
    )
    with pytest.raises(OSError):
        models.build(models.ModelSpec(builtin="fake"), 0)
    assert calls == ["fake"]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "converting the built-in model fake from GGUF (once) ..."
    assert err[1].startswith("converting the built-in model fake from GGUF (once): failed after ")
