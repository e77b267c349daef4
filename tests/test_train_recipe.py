"""Recipe validation: every class of bad recipe stops before training with the key and its line."""

from __future__ import annotations

import pytest
import torch
from slimtune.apps.cli import main as cli_main
from slimtune.apps.train import RecipeError, load_recipe, run

GOOD = """\
model:
  builtin: tiny-llama
method:
  name: full
tasks:
  - {name: copy, task: copy, n: 4, stage: a}
stages:
  - name: a
    data:
      - {task: copy, n: 16}
    steps: 1
    batch_size: 2
"""

# (what to replace in GOOD, its replacement, what the message must contain)
BAD = {
    "unknown key": ("    steps: 1\n", "    steps: 1\n    sptes: 2\n", ":12: stages[0].sptes: unknown key"),
    "misspelt key": ("batch_size: 2", "batch_sise: 2", "'batch_sise'; did you mean 'batch_size'?"),
    "stage named ..": ("  - name: a\n", "  - name: ..\n", ":8: stages[0].name: '..': a name starts with"),
    "stage named as a hidden file": ("  - name: a\n", "  - name: .a\n", ":8: stages[0].name: '.a'"),
    "kfpf k above the stage's steps": (
        "    steps: 1\n",
        "    steps: 1\n    kfpf: {k: 2}\n",
        "stages[0].kfpf.k: 2 FPF steps do not fit the stage's 1 training steps",
    ),
    "unknown log key": ("model:\n", "log: {wandb: true}\nmodel:\n", ":1: log.wandb: unknown key"),
    "unknown strategy": ("model:\n", "distributed: zero3\nmodel:\n", ":1: distributed: 'zero3' is not one"),
    "fsdp2 with a sparse-diff stage": (
        "method:\n  name: full\n",
        "distributed: fsdp2\nmethod:\n  name: sparse-diff\n",
        "distributed: fsdp2 does not train stage 'a' (sparse-diff: its gradient masks",
    ),
    "unknown top-level key": ("model:\n", "modle: {}\nmodel:\n", ":1: modle: unknown key"),
    "wrong type": ("batch_size: 2", "batch_size: two", ":12: stages[0].batch_size: expected an integer"),
    "not finite": ("steps: 1\n", "steps: 1\n    lr: .nan\n", ":12: stages[0].lr: expected a finite number"),
    "not positive": ("batch_size: 2", "batch_size: 0", ":12: stages[0].batch_size: must be > 0"),
    "missing file": ("{task: copy, n: 16}", "{path: nowhere.jsonl}", ":10: stages[0].data[0].path: "),
    "missing eval file": ("task: copy, n: 4,", "path: nowhere.jsonl,", ":6: tasks[0].path: "),
    "unknown method": ("name: full", "name: fancy", ":4: method.name: unknown method 'fancy'"),
    "unknown option": ("name: full", "name: paca\n  r: 2\n  rank: 4", ":6: method.rank: unknown paca option"),
    "option of another method": ("name: full", "name: full\n  r: 2", ":5: method.r: unknown full option"),
    "missing option": ("name: full", "name: paca", ":3: method: paca needs 'r'"),
    "bad option value": ("name: full", "name: paca\n  r: -1", ":3: method: PaCAConfig.r must be >= 1"),
    "model cannot take method": (
        "name: full",
        "name: paca\n  r: 999",
        ":3: method: paca cannot train this model",
    ),
    "unknown model": ("builtin: tiny-llama", "builtin: huge-llama", ":2: model.builtin: 'huge-llama'"),
    "unknown model config key": (
        "builtin: tiny-llama",
        "builtin: tiny-llama\n  config: {hidden_sise: 8}",
        ":3: model.config.hidden_sise: unknown key",
    ),
    "missing required key": ("    steps: 1\n", "", ":8: stages[0]: give exactly one of steps, epochs"),
    "both steps and epochs": ("    steps: 1\n", "    steps: 1\n    epochs: 1\n", "give exactly one of steps"),
    "no stages": ("stages:\n", "stages: []\nunused:\n", ":7: stages: a recipe needs at least one stage"),
    "unknown stage in task": ("stage: a}", "stage: z}", ":6: tasks[0].stage: 'z' is not a stage"),
    "unknown stage in data": ("{task: copy, n: 16}", "{stage: z}", ":10: stages[0].data[0].stage: 'z'"),
    "duplicate stage": (
        "    batch_size: 2\n",
        "    batch_size: 2\n" + GOOD[GOOD.index("  - name: a") :],
        "used twice",
    ),
    "unknown branch point": (
        "    steps: 1\n",
        "    steps: 1\n    from: z\n",
        ":12: stages[0].from: 'z' is not an earlier",
    ),
    "unknown generated task": ("{task: copy, n: 16}", "{task: dance}", ":10: stages[0].data[0].task"),
    "lines before training": (
        "    steps: 1\n",
        "    steps: 1\n    pre: [lines]\n",
        ":12: stages[0].pre[0]: lines",
    ),
    "diff of a dense stage": (
        "    steps: 1\n",
        "    steps: 1\n    post: [{add_diff: a}]\n",
        "neither a stage",
    ),
    "unknown operation": (
        "    steps: 1\n",
        "    steps: 1\n    post: [{shrink: 1}]\n",
        "unknown operation 'shrink'",
    ),
    "grad_accum split": ("batch_size: 2", "batch_size: 3\n    grad_accum: 2", "stages[0].batch_size: 3"),
    "sparse-diff weight decay": (
        "    steps: 1\n",
        "    steps: 1\n    method: {name: sparse-diff}\n    weight_decay: 0.1\n",
        ":13: stages[0].weight_decay: sparse-diff needs weight_decay 0",
    ),
    "yaml syntax": ("steps: 1", "steps: [1", "not valid YAML"),
    "duplicate key": (
        "    steps: 1\n",
        "    steps: 1\n    steps: 2\n",
        ":12: not valid YAML: duplicate key 'steps'",
    ),
    "steps beyond sense": (
        "steps: 1",
        "steps: 1000000000000",
        ":11: stages[0].steps: 1000000000000 is beyond",
    ),
    "steps as an exponent string": ("steps: 1", "steps: 1e12", ":11: stages[0].steps: expected an integer"),
    "n beyond sense": (
        "{task: copy, n: 16}",
        "{task: copy, n: 1000000000000}",
        ":10: stages[0].data[0].n: 1000",
    ),
    "seq_len beyond sense": (
        "model:\n",
        "seq_len: 1000000000\nmodel:\n",
        ":1: seq_len: 1000000000 is beyond",
    ),
    "seq_len beyond the model": (
        "model:\n",
        "seq_len: 4096\nmodel:\n",
        "exceeds the 512 positions of the model",
    ),
    "intruder threshold": (
        "model:\n",
        "intruders: {threshold: 2}\nmodel:\n",
        ":1: intruders.threshold: a cosine",
    ),
    "a hub id as the model's path": (
        "  builtin: tiny-llama\n",
        "  path: HuggingFaceTB/SmolLM2-135M-Instruct\n",
        ":2: model.path: 'HuggingFaceTB/SmolLM2-135M-Instruct' looks like a Hugging Face hub id",
    ),
    "not a mapping": (
        "    data:\n      - {task: copy, n: 16}\n",
        "    data:\n      - copy\n",
        ":9: stages[0].data[0]: expected a mapping",
    ),
}


def _write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_is_refused_before_training(tmp_path, case):
    old, new, message = BAD[case]
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError) as caught:
        run(path, tmp_path / "out")
    assert (f"{path}{message}" if message.startswith(":") else message) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_good_recipe_parses_with_defaults(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    (stage,) = recipe.stages
    assert (stage.steps, stage.batch_size, stage.grad_accum, stage.lr, stage.schedule) == (
        1,
        2,
        1,
        1e-3,
        "constant",
    )
    assert stage.method_name == "full" and recipe.tasks[0].stages == ("a",)


def test_fraction_and_exponent_strings_are_numbers(tmp_path):
    text = GOOD.replace("{task: copy, n: 16}", "{task: copy, n: 16, weight: 1/256}") + "    lr: 1e-3\n"
    stage = load_recipe(_write(tmp_path, text)).stages[0]
    assert stage.data[0].weight == 1 / 256 and stage.lr == 1e-3


def test_malformed_jsonl_names_its_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    path = _write(tmp_path, GOOD.replace("{task: copy, n: 16}", "{path: d.jsonl}"))
    with pytest.raises(RecipeError, match=r":10: stages\[0\].data\[0\].path: .*d.jsonl:2: not valid JSON"):
        run(path, tmp_path / "out")


def test_cli_prints_one_message_and_exits_2(tmp_path, capsys):
    path = _write(tmp_path, GOOD.replace("batch_size: 2", "batch_size: two"))
    assert cli_main(["train", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "stages[0].batch_size: expected an integer" in err and "Traceback" not in err


def test_non_utf8_recipe_and_data_name_their_line(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"# caf\xe9\n" + GOOD.encode())  # a Latin-1 comment on line 1
    assert cli_main(["train", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and "not UTF-8 text (byte 0xe9)" in err and "Traceback" not in err
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    path = _write(tmp_path, GOOD.replace("{task: copy, n: 16}", "{path: d.jsonl}"))
    with pytest.raises(RecipeError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        run(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_and_data_dir_that_is_no_dataset_are_refused(tmp_path):
    path = _write(tmp_path, GOOD)
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(RecipeError, match="is a file, not a folder"):
        run(path, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "not a folder"
    (tmp_path / "plain").mkdir()
    path = _write(tmp_path, GOOD.replace("{task: copy, n: 16}", "{path: plain}"))
    with pytest.raises(RecipeError, match=r"is a directory but not a dataset written by datasets\.save_to"):
        run(path, tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_device_cuda_without_cuda_is_refused_up_front(tmp_path):
    path = _write(tmp_path, "device: cuda\n" + GOOD)
    with pytest.raises(RecipeError, match="device: cuda was asked for but torch sees no CUDA device"):
        run(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_builtin_tokenizer_warns_about_characters_it_cannot_encode():
    from slimtune.apps.train.tokenizer import CharTokenizer

    tokenizer = CharTokenizer()
    with pytest.warns(UserWarning, match=r"cannot encode 'éïü'"):
        ids = tokenizer.encode("naïve? no: éü")[-2:]
    assert ids == [tokenizer.unk_id, tokenizer.unk_id]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per character
        tokenizer.encode("üéï plain")


def test_a_shipped_recipe_is_found_by_name(capsys):
    from slimtune.apps.shipped import SHIPPED, shipped_recipes

    assert "sequential" in shipped_recipes()
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    listed = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert all(name in listed for name in shipped_recipes()) and len(shipped_recipes()) >= 12
    assert load_recipe("sequential").file == SHIPPED / "sequential.yaml"
    assert (SHIPPED / "data").is_dir()


def _documented_defaults(heading: str) -> dict[str, object]:
    """The keys of a docs/trainer.md table whose default is one literal (`8`, `1e-3`, `constant`)."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    section = text[text.index(heading) + len(heading) :]
    section = section[: re.search(r"\n#+ ", section).start()]
    rows = re.findall(r"^\| `(\w+)` \| `([^`|]+)` \|", section, flags=re.M)
    return {key: yaml.safe_load(value) for key, value in rows}


def test_documented_defaults_are_the_code_s(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, GOOD.replace("    batch_size: 2\n", "").replace("method:\n  name: full\n", ""))
    )
    top = _documented_defaults("### Top level")
    assert set(top) >= {"seed", "seq_len", "device"}
    for key, value in top.items():
        code = recipe.stages[0].method_name if key == "method" else getattr(recipe, key)
        assert code == (value["name"] if key == "method" else value), key
    stages = _documented_defaults("### `stages`")
    assert set(stages) >= {"batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "weight_decay"}
    for key, value in stages.items():
        assert getattr(recipe.stages[0], key) == (
            float(value) if isinstance(value, str) and "e" in value else value
        ), key


@pytest.mark.parametrize(
    "name, heading", [("lines", "#### `lines`"), ("fpf", "#### `fpf`"), ("graft", "#### `graft`")]
)
def test_every_operation_setting_is_documented_with_the_code_s_default(name, heading):
    """The operation tables of docs/trainer.md list every key the generic reader reads, and each
    literal default there is the dataclass's."""
    import re
    from pathlib import Path

    from slimtune.apps.train.operations import OPERATIONS
    from slimtune.apps.train.schema import settings_of

    text = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    section = text[text.index(heading) :]
    section = section[: re.search(r"\n#+ ", section[1:]).start() + 1]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
    code = settings_of(OPERATIONS[name])
    assert documented == set(code), documented ^ set(code)
    for key, value in _documented_defaults(heading).items():
        expected = code[key][0]
        assert (float(value) if isinstance(value, str) and "e-" in value else value) == expected, key


def test_fsdp2_refuses_k_fpf_before_training(tmp_path):
    text = "distributed: fsdp2\n" + GOOD.replace("    steps: 1\n", "    steps: 2\n    kfpf: {k: 1}\n")
    with pytest.raises(RecipeError, match=r":1: distributed: fsdp2 does not run stage 'a''s k-FPF steps"):
        run(_write(tmp_path, text), tmp_path / "out")
    assert not (tmp_path / "out").exists()
