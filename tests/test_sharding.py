"""Sharding engines: under FSDP2 with 2 gloo processes every method takes the steps of one process
(PaCA and S2FT with their entries written into the weight shards after each optimizer step, with
and without lean mode, resharding after forward or not, an uneven shard, foreach and fused AdamW);
FSDP and DeepSpeed ZeRO-3 are refused at the first forward of PaCA or S2FT, naming the engine; a
merged model is not guarded."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import slimtune
import torch
import torch.distributed as dist
from tiny_models import make_batch, make_model, sharded_steps

IN_PLACE = {"paca": slimtune.PaCAConfig(r=4), "s2ft": slimtune.S2FTConfig(heads=1, channels=8)}


@pytest.fixture
def one_process(tmp_path):
    """A gloo process group of one (FSDP needs one; the refusal does not depend on the world size)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _refused(model: torch.nn.Module, engine: str) -> None:
    with pytest.raises(RuntimeError, match=rf"{engine}.*silently wrong.*DistributedDataParallel"):
        model(input_ids=make_batch())


def test_in_place_methods_refuse_fsdp1(one_process) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = slimtune.apply(make_model("llama"), IN_PLACE["paca"])
    FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    _refused(model, r"FSDP \(torch\.distributed\.fsdp\.FullyShardedDataParallel\)")


def test_in_place_methods_refuse_deepspeed_zero3() -> None:
    """ZeRO-3 marks every parameter it partitions with `ds_id` (DeepSpeed is not a test dependency:
    the mark stands in for it)."""
    model = slimtune.apply(make_model("llama"), IN_PLACE["s2ft"])
    for number, parameter in enumerate(model.parameters()):
        parameter.ds_id = number
    _refused(model, "DeepSpeed ZeRO-3")


def test_merge_and_delta_of_a_sharded_model_are_refused(one_process) -> None:
    from test_refusals import refused
    from torch.distributed.fsdp import fully_shard

    model = slimtune.apply(make_model("llama"), IN_PLACE["paca"])
    fully_shard(model)
    refused(
        model, lambda: slimtune.merge(model), ValueError, r"merge of a model sharded by FSDP2.*slimtune\.save"
    )
    refused(model, lambda: slimtune.delta(model), ValueError, r"delta of a model sharded by FSDP2")


def test_plain_merged_and_copied_models_are_not_refused() -> None:
    model = slimtune.apply(make_model("llama"), IN_PLACE["paca"])
    model(input_ids=make_batch())  # no engine
    copy.deepcopy(model)(input_ids=make_batch())
    merged = slimtune.merge(model)
    assert not merged._forward_pre_hooks
    for number, parameter in enumerate(merged.parameters()):
        parameter.ds_id = number
    merged(input_ids=make_batch())  # a plain model again: any engine may shard it


PACA, S2FT = slimtune.PaCAConfig(r=4), slimtune.S2FTConfig(heads=1, channels=8)
S2FT_ROWS = slimtune.S2FTConfig(heads=1, channels=8, train_v_rows=True, train_gate_up_rows=True)
UNEVEN = {"intermediate_size": 87}  # gate/up rows and down columns split 44 + 43
CASES = {  # name: (config, lean, reshard_after_forward, fused AdamW, model overrides, shard each block)
    "paca": (PACA, False, True, False, {}, True),
    "paca-keep-gathered": (PACA, False, False, False, {}, True),
    "paca-lean-fused": (PACA, True, True, True, {}, True),
    "paca-uneven": (PACA, False, True, False, UNEVEN, True),
    "paca-root-only": (PACA, False, True, False, {}, False),
    "s2ft": (S2FT, False, True, False, {}, True),
    "s2ft-lean-uneven": (S2FT, True, False, True, UNEVEN, True),
    "s2ft-root-only": (S2FT, False, False, False, {}, False),
    "s2ft-rows-uneven": (S2FT_ROWS, False, True, False, UNEVEN, True),  # rows: gathered, written by owner
    "lora": (slimtune.LoRAConfig(r=4, alpha=8), False, True, False, {}, True),
    "hydra-lean": (slimtune.HydraConfig(2, 2, alpha=4), True, True, False, {}, True),
}


def _train(case: str, rank: int, world: int) -> dict:
    """5 AdamW steps on a global batch of 4 rows (each rank its slice); the losses, and every trained
    tensor and every patched layer's weight after the last step, whole."""
    config, lean, reshard, fused, overrides, blocks = CASES[case]
    model = slimtune.apply(make_model("llama", **overrides), config)
    if lean:
        slimtune.lean(model)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers if blocks else []:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused or None)
    losses = sharded_steps(model, optimizer, rank, world)
    state = model.state_dict()  # syncs the layers (on shards under FSDP2)
    whole = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()
    }
    return {"losses": losses, "state": whole}


SAVED = ("paca-uneven", "s2ft-rows-uneven", "hydra-lean")


def _shard_and_save(case: str, folder: Path) -> None:
    """A freshly patched model, sharded and saved by every rank (rank 0 writes)."""
    from torch.distributed.fsdp import fully_shard

    config, lean, _, _, overrides, _ = CASES[case]
    model = slimtune.apply(make_model("llama", **overrides), config)
    if lean:
        slimtune.lean(model)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    slimtune.save(model, folder / case)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    results = {case: _train(case, rank, world) for case in CASES}
    for case in SAVED:
        _shard_and_save(case, Path(out).parent)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("fsdp2")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, f"file://{folder / 'pg'}", str(folder / "two.pt")), nprocs=2)
    return {**torch.load(folder / "two.pt"), "folder": folder}


@pytest.mark.parametrize("case", SAVED)
def test_a_sharded_model_saves_the_files_of_one_process(case: str, two_processes: dict, tmp_path) -> None:
    config, lean, _, _, overrides, _ = CASES[case]
    model = slimtune.apply(make_model("llama", **overrides), config)
    if lean:
        slimtune.lean(model)
    one = slimtune.save(model, tmp_path / case)
    sharded = two_processes["folder"] / case
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in one.iterdir())
    for file in one.iterdir():
        if file.suffix != ".safetensors":
            assert (sharded / file.name).read_bytes() == file.read_bytes(), file.name
            continue
        # The header's metadata order differs between processes (a hash map): compare the contents.
        (mine, meta), (theirs, their_meta) = (
            slimtune.files.read_tensors(f) for f in (file, sharded / file.name)
        )
        assert meta == their_meta and mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in mine), file


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_with_two_processes_takes_the_steps_of_one(case: str, two_processes: dict) -> None:
    torch.manual_seed(0)
    one, two = _train(case, 0, 1), two_processes[case]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert one["state"].keys() == two["state"].keys()
    for key, value in one["state"].items():  # the dense weights hold the trained entries too
        torch.testing.assert_close(two["state"][key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_partial_adamw_refuses_sharded_parameters_before_stepping(one_process) -> None:
    from torch.distributed.fsdp import fully_shard

    model = slimtune.apply(make_model("llama"), IN_PLACE["paca"])
    fully_shard(model)
    optimizer = slimtune.PartialAdamW(model, lr=1e-2)
    ids = make_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    before = {k: slimtune.sharding.gathered(v) for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"PartialAdamW does not step FSDP2-sharded.*torch\.optim\.AdamW"):
        optimizer.step()
    assert not optimizer.state
    for key, value in model.state_dict().items():
        assert torch.equal(slimtune.sharding.gathered(value), before[key]), key
