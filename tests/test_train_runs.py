"""End to end: each shipped recipe on a tiny model; resume equals a whole run; DDP equals one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import slimtune
import torch
import yaml
from slimtune.apps.cli import main
from slimtune.apps.train import RecipeError, load_recipe, loop, run, step_log
from slimtune.apps.train.models import ModelSpec, build

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _shrunk(recipe: Path) -> dict:
    """The recipe on a tiny model for a few steps; data paths made absolute."""
    data = yaml.safe_load(recipe.read_text())
    data["model"] = {"builtin": "tiny-llama"}
    if "dense_steps" in data["method"]:
        data["method"]["dense_steps"] = 2
    for task in data["tasks"]:
        task["n"] = 4
    for stage in data["stages"]:
        stage.update(steps=2, batch_size=4)
        if "kfpf" in stage:  # at most one FPF step after each training step
            stage["kfpf"]["k"] = min(stage["kfpf"]["k"], 2)
        for source in stage["data"]:
            if "task" in source:
                source["n"] = 32
    for entry in [*data["tasks"], *(s for stage in data["stages"] for s in stage["data"])]:
        if "path" in entry:
            entry["path"] = str(recipe.parent / entry["path"])
    return data


@pytest.mark.filterwarnings("error")  # a default run prints no warning (deprecations included)
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipe_runs_on_a_tiny_model(tmp_path, recipe, capfd):
    data = _shrunk(recipe)
    path = _write(tmp_path, data)
    result = run(path, tmp_path / "run")
    printed = capfd.readouterr().err
    assert "warn" not in printed.lower() and "deprecat" not in printed.lower(), printed[-2000:]
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report == result.metrics
    assert len(report["accuracy"]) == len(data["stages"])
    base = json.loads((tmp_path / "run" / "base.json").read_text())
    for task, accuracy in zip(report["tasks"], report["base"]["accuracy"], strict=True):
        if accuracy is not None:  # each item's score, in order, beside the accuracy they make
            correct = base[task]["correct"]
            assert set(correct) <= {0, 1} and sum(correct) / len(correct) == accuracy, task
    assert all(len(row) == len(data["tasks"]) for row in report["accuracy"])
    dense = [2 if stage.method_name == "sparse-diff" else 0 for stage in load_recipe(path).stages]
    assert [t["steps"] for t in report["training"]] == [2 + d for d in dense]
    for name in ("forgetting.png", "losses.png", "summary.txt", "train.log"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    logged = (tmp_path / "run" / "train.log").read_text()
    assert all(f in logged for f in (", lr ", ", grad norm ", " tokens/s, ")), logged[-1000:]


def test_grad_norm_is_the_norm_of_all_gradients_together():
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params[:2]:  # the third has no gradient
        p.grad = torch.randn_like(p)
    together = torch.cat([p.grad.flatten() for p in params[:2]])
    assert loop.grad_norm(params) == pytest.approx(float(torch.linalg.vector_norm(together)))
    assert loop.grad_norm([]) == 0.0


def _four_stages() -> dict:
    """PaCA, LoRA, LT-SFT, then HFT with LiNeS: every kind of checkpoint and a replayed operation."""
    stage = {"batch_size": 4, "steps": 3, "lr": 1.0e-2}
    return {
        "seed": 1,
        "seq_len": 32,
        "model": {"builtin": "tiny-llama"},
        "method": {"name": "paca", "r": 4},
        "tasks": [
            {"name": "copy", "task": "copy", "n": 8, "stage": "a"},
            {"name": "reverse", "task": "reverse", "n": 8, "stage": "b"},
        ],
        "stages": [
            {"name": "a", "data": [{"task": "copy", "n": 64}], **stage},
            {
                "name": "lora",
                "data": [{"task": "copy", "n": 64}],
                "method": {"name": "lora", "r": 2, "alpha": 4},
            }
            | stage,
            {
                "name": "b",
                "data": [{"task": "reverse", "n": 64}],
                "method": {"name": "sparse-diff", "k": 200, "dense_steps": 2},
                **stage,
            },
            {
                "name": "c",
                "data": [{"task": "shift", "n": 64}],
                "method": {"name": "hft"},
                "post": [{"lines": {"alpha": 0.4}}],
                **stage,
            },
        ],
    }


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    recipe = _write(tmp_path, _four_stages())
    whole = run(recipe, tmp_path / "whole")

    trained, interrupt = [], ["c"]
    original = loop.train

    def train(model, params, packed, order, stage, *args):
        trained.append(stage.name)
        if stage.name in interrupt:
            raise Interrupted
        return original(model, params, packed, order, stage, *args)

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(Interrupted):
        run(recipe, tmp_path / "cut")
    assert not (tmp_path / "cut" / "stages" / "04-c" / "result.json").exists()
    with pytest.raises(RecipeError, match="pass --resume"):
        run(recipe, tmp_path / "cut")
    trained.clear(), interrupt.clear()
    resumed = run(recipe, tmp_path / "cut", resume=True)
    assert trained == ["c"]  # finished stages are restored from their checkpoints, not retrained

    for key in ("accuracy", "loss", "base", "backward_transfer", "average_forgetting"):
        assert resumed.metrics[key] == whole.metrics[key], key
    for stage in ("01-a", "02-lora", "03-b", "04-c"):
        whole_losses, resumed_losses = (
            json.loads((tmp_path / folder / "stages" / stage / "result.json").read_text())["losses"]
            for folder in ("whole", "cut")
        )
        assert whole_losses == resumed_losses
    for name, parameter in whole.model.named_parameters():
        assert torch.equal(parameter, resumed.model.get_parameter(name)), name


def _steps_csv(folder: Path) -> list[dict[str, str]]:
    with (folder / "steps.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_steps_csv_holds_every_step_and_a_resumed_stage_writes_it_anew(tmp_path, monkeypatch):
    """Each stage's steps.csv: a row per optimizer step (dense warm-up steps included) with the loss
    of result.json and the learning rate of the schedule; a stage cut after 2 steps keeps those rows,
    and resumed, writes its file anew with the whole run's losses; finished stages' files stay as
    they were."""
    data = _four_stages()
    data["stages"] = [data["stages"][0], data["stages"][2]]  # PaCA, then sparse-diff (2 dense steps)
    recipe = _write(tmp_path, data)
    whole = tmp_path / "whole" / "stages"
    run(recipe, tmp_path / "whole")
    for stage, spec in zip(("01-a", "02-b"), load_recipe(recipe).stages, strict=True):
        rows, result = _steps_csv(whole / stage), json.loads((whole / stage / "result.json").read_text())
        assert [int(r["step"]) for r in rows] == list(range(1, len(result["losses"]) + 1))
        assert [float(r["loss"]) for r in rows] == pytest.approx(result["losses"], rel=1e-5)
        assert all(float(r["grad_norm"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
        if stage == "01-a":  # one schedule over the stage's 3 steps
            expected = [spec.lr * loop.lr_factor(spec, 3, k) for k in range(3)]
            assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)

    original = step_log.CSVSink.write

    def write(self, record):
        original(self, record)
        if "02-b" in self.file.name and record.step == 2:
            raise Interrupted

    monkeypatch.setattr(step_log.CSVSink, "write", write)
    with pytest.raises(Interrupted):
        run(recipe, tmp_path / "cut")
    cut = tmp_path / "cut" / "stages"
    assert len(_steps_csv(cut / "02-b")) == 2  # a cut run keeps the steps it made
    monkeypatch.setattr(step_log.CSVSink, "write", original)
    finished = (cut / "01-a" / "steps.csv").read_bytes()
    run(recipe, tmp_path / "cut", resume=True)
    assert (cut / "01-a" / "steps.csv").read_bytes() == finished
    assert [r["loss"] for r in _steps_csv(cut / "02-b")] == [r["loss"] for r in _steps_csv(whole / "02-b")]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_writes_each_stage_and_the_evaluations(tmp_path, capfd):
    data = _four_stages()
    data["stages"], data["tasks"][1]["stage"] = data["stages"][:2], "lora"
    recipe = _write(tmp_path, data)
    assert main(["train", str(recipe), "--output", str(tmp_path / "run"), "--report-to", "tensorboard"]) == 0
    board, metrics = (
        tmp_path / "run" / "tensorboard",
        json.loads((tmp_path / "run" / "metrics.json").read_text()),
    )
    for stage in ("01-a", "02-lora"):
        losses = json.loads((tmp_path / "run" / "stages" / stage / "result.json").read_text())["losses"]
        scalars = _scalars(board / stage)
        assert set(scalars) == {f"train/{k}" for k in ("loss", "lr", "grad_norm", "tokens_per_s", "ms")}
        assert [s for s, _ in scalars["train/loss"]] == list(range(1, len(losses) + 1))
        assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)
    evaluation = _scalars(board / "evaluation")
    for j, task in enumerate(metrics["tasks"]):
        rows = [metrics["base"]["loss"][j]] + [row[j] for row in metrics["loss"]]
        assert evaluation[f"eval/{task}/loss"] == [
            (k, pytest.approx(v, rel=1e-6)) for k, v in enumerate(rows)
        ]
    # The recipe asking for TensorBoard is the same run: a resume with `log` added is accepted.
    data["log"] = {"tensorboard": True}
    assert main(["train", str(_write(tmp_path, data)), "--output", str(tmp_path / "run"), "--resume"]) == 0


def test_tensorboard_without_its_package_is_refused_before_the_run_folder_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(step_log.importlib.util, "find_spec", lambda name: None)
    data = _four_stages() | {"log": {"tensorboard": True}}
    with pytest.raises(
        RecipeError, match=r"log\.tensorboard: TensorBoard logging needs .*slimtune\[tensorboard\]"
    ):
        run(_write(tmp_path, data), tmp_path / "run")
    with pytest.raises(RecipeError, match=r"--report-to tensorboard: .*pip install tensorboard"):
        run(_write(tmp_path, _four_stages()), tmp_path / "run", report_to="tensorboard")
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_recipe(tmp_path):
    data = _four_stages()
    data["stages"], data["tasks"] = data["stages"][:1], data["tasks"][:1]
    run(_write(tmp_path, data), tmp_path / "run")
    data["seed"] = 2
    with pytest.raises(RecipeError, match="a different recipe"):
        run(_write(tmp_path, data), tmp_path / "run", resume=True)


def test_intruder_dimensions_are_counted_after_every_stage(tmp_path):
    data = _four_stages()
    data["stages"], data["tasks"] = data["stages"][:2], data["tasks"][:1]
    data["intruders"] = {"k": 4, "threshold": 0.5}
    result = run(_write(tmp_path, data), tmp_path / "run")
    intruders = result.metrics["intruders"]
    assert list(intruders) == [s["name"] for s in data["stages"]]
    for record in intruders.values():
        assert record["total"] == sum(record["per_module"].values()) == sum(record["per_block"])
        assert len(record["per_block"]) == 2 and all(0 <= c <= 4 for c in record["per_module"].values())
    assert (tmp_path / "run" / "intruders.png").is_file()
    stage = json.loads(
        (tmp_path / "run" / "stages" / f"01-{data['stages'][0]['name']}" / "result.json").read_text()
    )
    assert stage["intruders"] == intruders[data["stages"][0]["name"]]["per_module"]


def test_stages_from_base_start_from_the_model_as_built(tmp_path):
    data = _four_stages()
    first = dict(data["stages"][0], lr=5e-2)
    again = dict(first, name="again", **{"from": "base"}, lr=1e-12)  # no change: the base again
    data["stages"], data["tasks"] = [first, again], [dict(data["tasks"][0], stage=["a0", "again"])]
    data["stages"][0]["name"] = "a0"
    result = run(_write(tmp_path, data), tmp_path / "run")
    base_loss, (trained, untrained) = result.metrics["base"]["loss"][0], result.metrics["loss"]
    assert abs(untrained[0] - base_loss) < 1e-4 < abs(trained[0] - base_loss)


def test_resume_refuses_changed_data_unless_told(tmp_path):
    (tmp_path / "data.jsonl").write_text(
        "".join(f'{{"prompt": "{i}+{i}=", "completion": "{2 * i}"}}\n' for i in range(20))
    )
    data = _four_stages()
    data["stages"], data["tasks"] = data["stages"][:1], data["tasks"][:1]
    data["stages"][0]["data"] = [{"path": str(tmp_path / "data.jsonl")}]
    recipe = _write(tmp_path, data)
    run(recipe, tmp_path / "run")
    digests = json.loads((tmp_path / "run" / "data.json").read_text())
    assert list(digests) == ["data.jsonl"]  # from the recipe's folder, whatever the working directory
    run(recipe, tmp_path / "run", resume=True)  # same data: resumes
    cwd = os.getcwd()
    try:  # the same run resumed from elsewhere, the recipe given by a relative path
        os.chdir(tmp_path)
        run("recipe.yaml", "run", resume=True)
    finally:
        os.chdir(cwd)
    with open(tmp_path / "data.jsonl", "a") as handle:
        handle.write('{"prompt": "9+9=", "completion": "19"}\n')
    with pytest.raises(RecipeError, match=r"data\.jsonl: the data changed since the run .* --changed-data"):
        run(recipe, tmp_path / "run", resume=True)
    assert json.loads((tmp_path / "run" / "data.json").read_text()) == digests  # the folder is unchanged
    run(recipe, tmp_path / "run", resume=True, changed_data=True)
    assert json.loads((tmp_path / "run" / "data.json").read_text()) != digests


def test_a_damaged_run_file_is_named_on_resume(tmp_path):
    data = _four_stages()
    data["stages"], data["tasks"] = data["stages"][:1], data["tasks"][:1]
    recipe = _write(tmp_path, data)
    run(recipe, tmp_path / "run")
    (tmp_path / "run" / "base.json").write_bytes(b'{"copy": \xff')
    with pytest.raises(RecipeError, match=r"base\.json is not valid JSON.*run folder is damaged"):
        run(recipe, tmp_path / "run", resume=True)


def test_a_given_base_evaluation_is_completed_with_the_tasks_it_lacks(tmp_path):
    data = _four_stages()
    data["stages"] = data["stages"][:1]
    data["tasks"][1].pop("stage")
    recipe = _write(tmp_path, data)
    whole = run(recipe, tmp_path / "whole").metrics
    (tmp_path / "given").mkdir()
    given = json.loads((tmp_path / "whole" / "base.json").read_text())
    (tmp_path / "given" / "base.json").write_text(
        json.dumps({"copy": given["copy"]})
    )  # as a benchmark shares it
    completed = run(recipe, tmp_path / "given").metrics
    assert json.loads((tmp_path / "given" / "base.json").read_text()) == given
    assert completed["base"] == whole["base"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_processes_give_the_losses_of_one(tmp_path, strategy):
    """`torchrun` with 2 processes, as DDP or as FSDP2 shards (each stage trains a sharded copy whose
    state comes back to every rank): the steps, evaluations and final weights of one process."""
    stage = {"batch_size": 8, "grad_accum": 2, "steps": 3, "lr": 1.0e-2}
    data = {
        "seq_len": 32,
        "device": "cpu",
        "distributed": strategy,
        "model": {"builtin": "tiny-llama"},
        "tasks": [{"name": "copy", "task": "copy", "n": 4}],
        "stages": [
            {"name": "full", "data": [{"task": "copy", "n": 128}], **stage},
            {
                "name": "paca",
                "data": [{"task": "reverse", "n": 128}],
                "method": {"name": "paca", "r": 4},
                **stage,
            },
            {
                "name": "lora",
                "data": [{"task": "shift", "n": 128}],
                "method": {"name": "lora", "r": 4, "alpha": 8},
                **stage,
            },
        ],
    }
    recipe = _write(tmp_path, data)
    one = run(recipe, tmp_path / "one", export_hf=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "slimtune", "train", str(recipe), "--output", str(tmp_path / "two"), "--export-hf"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage_dir in ("01-full", "02-paca", "03-lora"):
        first, second = (
            json.loads((tmp_path / d / "stages" / stage_dir / "result.json").read_text())
            for d in ("one", "two")
        )
        assert second["losses"] == pytest.approx(first["losses"], rel=1e-5)
        assert second["eval"]["copy"]["loss"] == pytest.approx(first["eval"]["copy"]["loss"], rel=1e-5)
    two = slimtune.files.read_tensors(tmp_path / "two" / "export" / "lora" / "model.safetensors")[0]
    assert two.keys() == one.model.state_dict().keys()  # rank 0 exported the whole plain model
    # Adam's steps magnify reduction-order rounding in entries with tiny gradients: after 9 steps at
    # lr 1e-2 the weights agree to 3e-5 (DDP and FSDP2 alike), not entry for entry to 1e-5.
    for name, parameter in one.model.state_dict().items():
        torch.testing.assert_close(two[name], parameter, rtol=0, atol=1e-4, msg=name)
    sharded = "FSDP2 shards" in (tmp_path / "two" / "train.log").read_text()
    assert sharded == (strategy == "fsdp2")


def test_a_run_leaves_a_process_group_its_caller_started(tmp_path, monkeypatch):
    """`World.close` ends only the group `World.start` began (the torchrun launch above ends its
    own): a caller's group outlives the run."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, but the group is already there
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        world = loop.World.start("cpu")
        world.close()
        assert not world.owns_group and dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_plain_text_data_and_epochs(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox"}) + "\n" for i in range(40)))
    data = {
        "seq_len": 64,
        "model": {"builtin": "tiny-llama"},
        "tasks": [{"name": "text", "path": str(text), "n": 8}, {"name": "copy", "task": "copy", "n": 4}],
        "stages": [{"name": "lm", "data": [{"path": str(text)}], "epochs": 2, "batch_size": 4, "lr": 1.0e-2}],
    }
    result = run(_write(tmp_path, data), tmp_path / "run")
    rows = -(-40 // 2)  # 31-32 tokens per line: two lines to a 64-token row
    assert result.metrics["training"][0]["steps"] == -(-2 * rows // 4)
    assert result.metrics["accuracy"] == [[None, result.metrics["accuracy"][0][1]]]
    assert result.metrics["loss"][0][0] < result.metrics["base"]["loss"][0]


def test_branches_start_from_the_named_stage(tmp_path):
    stage = {"batch_size": 4, "steps": 3, "lr": 1.0e-2}
    a = {"name": "a", "data": [{"task": "copy", "n": 64}], **stage}
    b = {"name": "b", "data": [{"task": "reverse", "n": 64}], **stage}
    c = {"name": "c", "from": "a", "data": [{"task": "shift", "n": 64}], "method": {"name": "paca", "r": 4}}
    data = {
        "seq_len": 32,
        "model": {"builtin": "tiny-llama"},
        "tasks": [
            {"name": "copy", "task": "copy", "n": 8, "stage": "a"},
            {"name": "later", "task": "shift", "n": 8, "stage": ["b", "c"]},
        ],
        "stages": [a, b, c | stage],
    }
    branched = run(_write(tmp_path, data, "branched.yaml"), tmp_path / "branched")
    data["stages"] = [a, {k: v for k, v in c.items() if k != "from"} | stage]
    data["tasks"][1]["stage"] = "c"
    linear = run(_write(tmp_path, data, "linear.yaml"), tmp_path / "linear")
    for name, parameter in linear.model.named_parameters():
        assert torch.equal(parameter, branched.model.get_parameter(name)), name
    assert branched.metrics["accuracy"][2] == linear.metrics["accuracy"][1]
    assert set(branched.metrics["branches"]) == {"b", "c"}
    assert branched.metrics["branches"]["c"] == linear.metrics["branches"]["c"]


def test_local_model_directory_with_its_tokenizer(tmp_path):
    import string

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {
        c: i + 4 for i, c in enumerate(string.printable[:95])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(
        tmp_path / "model"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    data = {
        "model": {"path": str(tmp_path / "model")},
        "method": {"name": "paca", "r": 4},
        "tasks": [{"name": "reverse", "task": "reverse", "n": 4, "stage": "a"}],
        "stages": [
            {"name": "a", "data": [{"task": "reverse", "n": 32}], "steps": 3, "batch_size": 4, "lr": 1e-2}
        ],
    }
    result = run(_write(tmp_path, data), tmp_path / "run")
    assert result.metrics["loss"][0][0] < result.metrics["base"]["loss"][0]


def test_a_full_disk_mid_run_is_one_message_and_the_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    import errno

    data = _four_stages()
    data["stages"], data["tasks"][1]["stage"] = data["stages"][:2], "lora"
    recipe = _write(tmp_path, data)
    whole = run(recipe, tmp_path / "whole")
    original, calls = slimtune.files.write_text, []

    def full(path, text):
        calls.append(path)
        if "02-lora" in str(path) and str(path).endswith("result.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, text)

    monkeypatch.setattr(slimtune.files, "write_text", full)
    assert main(["train", str(recipe), "--output", str(tmp_path / "cut")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device writing " in err
    assert f"--output {tmp_path / 'cut'} --resume`" in err
    monkeypatch.setattr(slimtune.files, "write_text", original)
    resumed = run(recipe, tmp_path / "cut", resume=True)
    assert resumed.metrics["accuracy"] == whole.metrics["accuracy"]
    for name, parameter in whole.model.named_parameters():
        assert torch.equal(parameter, resumed.model.get_parameter(name)), name


@pytest.mark.parametrize("method", [{"name": "paca", "r": 4}, {"name": "s2ft", "heads": 1, "channels": 4}])
def test_lines_after_a_partial_method_scales_exactly_its_change(tmp_path, method):
    """LiNeS after PaCA or S2FT (the benchmark's paca+lines, s2ft+lines): each weight ends at
    start + factor * (trained - start), the trained entries' change only, the rest untouched."""
    stage = {"name": "a", "data": [{"task": "copy", "n": 32}], "batch_size": 4, "steps": 2, "lr": 1.0e-2}
    task = {"name": "copy", "task": "copy", "n": 8, "stage": "a"}
    recipe = {"seed": 3, "seq_len": 32, "model": {"builtin": "tiny-llama"}, "method": method}
    recipe |= {"tasks": [task], "stages": [stage]}
    plain = run(_write(tmp_path, recipe, "plain.yaml"), tmp_path / "plain")
    scaled_stage = {**stage, "post": [{"lines": {"alpha": 0.2, "beta": 0.6}}]}
    scaled = run(_write(tmp_path, {**recipe, "stages": [scaled_stage]}, "lines.yaml"), tmp_path / "lines")
    start, _ = build(ModelSpec(builtin="tiny-llama"), seed=3)
    factors = slimtune.toolbox.lines.scales(plain.model, 0.2, 0.6)
    assert sorted(set(factors.values())) == pytest.approx([0.2, 0.8])  # block 0 (and outside), block 1
    changed = set()
    for name, before in start.named_parameters():
        trained, got = plain.model.get_parameter(name).detach(), scaled.model.get_parameter(name).detach()
        delta = trained - before.detach()
        torch.testing.assert_close(got, before.detach() + factors[name] * delta, rtol=0, atol=1e-6)
        if delta.abs().sum() > 0:
            changed.add(name.rsplit(".", 2)[-2])
    assert changed and changed <= {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
