"""Fuzz of every loader of saved state: random corruptions of valid files (flipped bytes, truncation,
edited JSON, hand-made tensor files with missing, reshaped, retyped or out-of-range tensors). Each
corrupted file either loads to exactly what the intact file gives or is refused with a ValueError or
TypeError that names the problem, and a refusal leaves the model untouched."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import slimtune
import torch
from safetensors.torch import load_file, save_file
from slimtune.sparse_delta import ENTRIES, DeltaEntry, SparseDelta
from test_refusals import assert_untouched, snapshot
from tiny_models import make_batch, make_model

TRIALS = 60
METHODS = {
    "paca": slimtune.PaCAConfig(r=4),
    "s2ft": slimtune.S2FTConfig(heads=2, channels=8),
    "lora": slimtune.LoRAConfig(r=4, alpha=8),
}


def _trained(config) -> torch.nn.Module:
    model = make_model("llama")
    slimtune.apply(model, config)
    with torch.no_grad():
        for parameter in slimtune.trainable_parameters(model):
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=make_batch()).logits


def _flip_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    for _ in range(rng.choice([1, 2, 8])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "flipped"


def _truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])
    return "truncated"


def _edit_json(path: Path, rng: random.Random) -> str:
    """Delete a key or replace a value somewhere in the JSON tree by a value of another kind."""
    data = json.loads(path.read_text())
    node, key = data, None
    while isinstance(node, dict) and node and (key is None or rng.random() < 0.6):
        key = rng.choice(sorted(node))
        if isinstance(node[key], dict) and node[key] and rng.random() < 0.6:
            node = node[key]
            key = None
            continue
        break
    if key is None:
        key = rng.choice(sorted(node)) if isinstance(node, dict) and node else None
    if key is None:
        return "nothing"
    if rng.random() < 0.3:
        del node[key]
        edit = f"deleted {key}"
    else:
        node[key] = rng.choice([None, "x", -1, 0, 2.5, 1e30, [], {}, [1, 2], True, "all-linear"])
        edit = f"{key} = {node[key]!r}"
    path.write_text(json.dumps(data))
    return edit


def _edit_tensors(path: Path, rng: random.Random) -> str:
    """A hand-made tensor file (no checksum): drop, reshape, retype or scramble one tensor."""
    tensors = load_file(path)
    key = rng.choice(sorted(tensors))
    tensor = tensors[key]
    kind = rng.choice(["drop", "reshape", "int32", "float", "scramble", "extra"])
    if kind == "drop":
        del tensors[key]
    elif kind == "reshape":
        tensors[key] = torch.cat([tensor.reshape(-1), tensor.reshape(-1)[:1]])
    elif kind == "int32":
        tensors[key] = tensor.to(torch.int32)
    elif kind == "float":  # a lossless retype: loads exactly
        tensors[key] = tensor.to(torch.float64)
    elif kind == "scramble" and not tensor.is_floating_point():
        tensors[key] = torch.randint(-3, int(tensor.max()) + 4, tensor.shape, dtype=tensor.dtype)
    else:
        tensors[f"{key}.extra"] = tensor.clone()
    save_file(tensors, path)
    return f"{kind} {key}"


def _corrupt(files: list[Path], rng: random.Random) -> str:
    path = rng.choice(files)
    if path.suffix == ".json":
        how = rng.choice([_flip_bytes, _truncate, _edit_json, _edit_json])
    else:
        how = rng.choice([_flip_bytes, _truncate, _edit_tensors, _edit_tensors])
    return f"{how.__name__} on {path.name}: {how(path, rng)}"


def _fuzz(
    pristine: Path,
    load: Callable[[Path, torch.nn.Module], torch.nn.Module],
    expected: torch.Tensor,
    seed: int,
) -> dict[str, int]:
    """Corrupt a copy of `pristine` TRIALS times; each either loads exactly or is refused untouched."""
    outcomes = {"loaded exactly": 0, "refused": 0}
    rng = random.Random(seed)
    for trial in range(TRIALS):
        copy = pristine.parent / f"{pristine.name}-fuzz-{trial}"
        if pristine.is_dir():
            shutil.copytree(pristine, copy)
            files = sorted(copy.iterdir())
        else:
            shutil.copy(pristine, copy)
            files = [copy]
        what = _corrupt(files, rng)
        model = make_model("llama")
        before = snapshot(model)
        try:
            loaded = load(copy, model)
        except (ValueError, TypeError) as err:
            assert not isinstance(err, UnicodeDecodeError), (what, err)
            assert str(err), what
            assert_untouched(model, before)
            outcomes["refused"] += 1
        else:
            assert torch.equal(_outputs(loaded), expected), f"{what} loaded into a different model"
            outcomes["loaded exactly"] += 1
    return outcomes


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuzzed_checkpoints_load_exactly_or_are_refused_untouched(method, tmp_path) -> None:
    source = _trained(METHODS[method])
    pristine = slimtune.save(source, tmp_path / method)
    outcomes = _fuzz(pristine, lambda d, m: slimtune.load(m, d), _outputs(source), seed=len(method))
    assert outcomes["refused"] > TRIALS // 2, outcomes  # most corruptions change something that matters


def test_fuzzed_peft_adapters_load_exactly_or_are_refused_untouched(tmp_path) -> None:
    source = _trained(METHODS["lora"])
    pristine = slimtune.save(source, tmp_path / "peft", format="peft")
    outcomes = _fuzz(pristine, lambda d, m: slimtune.load_peft(m, d), _outputs(source), seed=7)
    assert outcomes["refused"] > TRIALS // 2, outcomes


@pytest.mark.parametrize("kind", ["sparse-delta", "entry-diff"])
def test_fuzzed_diffs_load_exactly_or_are_refused_untouched(kind, tmp_path) -> None:
    if kind == "sparse-delta":
        source = _trained(METHODS["paca"])
        diff = slimtune.delta(source)
        slimtune.merge(source)
    else:
        model = make_model("llama")
        diff = SparseDelta(
            {
                "model.norm.weight": DeltaEntry(ENTRIES, torch.tensor([0, 3, 9]), torch.randn(3).double()),
                "model.layers.1.mlp.up_proj.weight": DeltaEntry(
                    ENTRIES, torch.tensor([5, 70, 71]), torch.randn(3).double()
                ),
            }
        )
        source = diff.apply(model)
    pristine = diff.save(tmp_path / f"{kind}.safetensors")
    outcomes = _fuzz(pristine, lambda f, m: slimtune.load_delta(f).apply(m), _outputs(source), seed=11)
    assert outcomes["refused"] > TRIALS // 2, outcomes
