"""Sharding engines: under FSDP2 with 2 gloo processes every method takes the steps of one process
(PaCA and S2FT with their entries written into the weight shards after each optimizer step, with
and without lean mode, resharding after forward or not, uneven shards, torch's AdamW (foreach and
fused) and PartialAdamW), every rank's weight shards exact after every step, and bf16 compute on
float32 masters; FSDP and DeepSpeed ZeRO-3 are refused at the first forward of PaCA or S2FT,
naming the engine; a merged model is not guarded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import slimtune
import torch
import torch.distributed as dist
from tiny_models import make_batch, make_model, run_two_processes, sharded_steps

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
    """ZeRO-3 marks every parameter it partitions with `ds_id`: the mark stands in for the engine here
    (tests/test_deepspeed.py runs the real one)."""
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
BF16 = "bf16"  # FSDP2 computes in bf16 (MixedPrecisionPolicy) on float32 shards: the masters
METHODS = {
    "paca": PACA,
    "s2ft": S2FT,
    "lora": slimtune.LoRAConfig(r=4, alpha=8),
    "hydra": slimtune.HydraConfig(2, 2, alpha=4),
}
# name: (config, lean, reshard_after_forward, optimizer, model overrides, shard each block). Every
# method with each optimizer, resharding after forward or not; then lean mode, fused AdamW, uneven
# shards, root-only wrapping, S2FT's rows and bf16 compute.
CASES = {
    f"{method}-{kind}-{'reshard' if reshard else 'keep'}": (config, False, reshard, kind, {}, True)
    for method, config in METHODS.items()
    for kind in ("adamw", "partial")
    for reshard in (True, False)
}
CASES |= {
    "paca-lean-fused": (PACA, True, True, "adamw-fused", {}, True),
    "paca-uneven": (PACA, False, True, "adamw", UNEVEN, True),
    "paca-root-only": (PACA, False, True, "adamw", {}, False),
    "paca-partial-adamw-lean-uneven": (PACA, True, False, "partial", UNEVEN, True),
    "s2ft-lean-uneven": (S2FT, True, False, "adamw-fused", UNEVEN, True),
    "s2ft-root-only": (S2FT, False, False, "adamw", {}, False),
    "s2ft-rows-uneven": (S2FT_ROWS, False, True, "adamw", UNEVEN, True),  # rows: gathered, written by owner
    "s2ft-rows-partial-adamw": (S2FT_ROWS, False, False, "partial", UNEVEN, True),
    "hydra-lean": (METHODS["hydra"], True, True, "adamw", {}, True),
    "hydra-partial-adamw-uneven": (METHODS["hydra"], False, True, "partial", UNEVEN, True),
    "paca-bf16-masters": (PACA, False, True, BF16, {}, True),
    "s2ft-rows-bf16-masters": (S2FT_ROWS, False, True, BF16, UNEVEN, True),
    "paca-bf16-weights": (PACA, False, True, "adamw", {"dtype": torch.bfloat16}, True),  # float32 columns
    "s2ft-rows-bf16-weights-partial-adamw": (
        S2FT_ROWS,
        False,
        False,
        "partial",
        {"dtype": torch.bfloat16},
        True,
    ),
}


def _in_bf16(case: str) -> bool:
    """Whether the case computes in bf16 (FSDP2's policy, or bf16 weights with float32 masters)."""
    _, _, _, kind, overrides, _ = CASES[case]
    return kind == BF16 or overrides.get("dtype") == torch.bfloat16


def _optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "partial":
        return slimtune.PartialAdamW(model, lr=1e-2, weight_decay=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2, fused=kind == "adamw-fused" or None)


def _shard(model: torch.nn.Module, reshard: bool, blocks: bool, kind: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if kind == BF16 else MixedPrecisionPolicy()
    for block in model.model.layers if blocks else []:
        fully_shard(block, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


class ShardCheck:
    """After every optimizer step, each rank's local shard of every partial layer's weight must be
    exactly the weight as patched with the trained entries written in (the trained tensor's values,
    gathered, at the layer's index), row for row: what the next forward gathers."""

    def __init__(self, model: torch.nn.Module, rank: int, world: int) -> None:
        from slimtune.layers import PartialLinear

        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, PartialLinear)}
        self.initial = {n: _whole(m.weight) for n, m in self.layers.items()}
        self.rank, self.world, self.steps = rank, world, 0

    def __call__(self) -> None:
        from slimtune.layers.partial import COLUMNS

        for name, layer in self.layers.items():
            expected = self.initial[name].clone()
            values = _whole(layer.trained).to(expected.dtype)
            expected.index_copy_(1 if layer.axis == COLUMNS else 0, layer.index.cpu(), values)
            rows = torch.arange(expected.shape[0]).chunk(self.world)[self.rank]
            local = layer.weight.to_local() if hasattr(layer.weight, "to_local") else layer.weight
            assert torch.equal(local.detach(), expected[rows]), f"{name} after step {self.steps + 1}"
        self.steps += 1


def _train(case: str, rank: int, world: int) -> dict:
    """5 AdamW steps on a global batch of 4 rows (each rank its slice); the losses, and every trained
    tensor and every patched layer's weight after the last step, whole. Sharded, every rank's weight
    shards are checked after every step (`ShardCheck`)."""
    config, lean, reshard, kind, overrides, blocks = CASES[case]
    model = slimtune.apply(make_model("llama", **overrides), config)
    if lean:
        slimtune.lean(model)
    check = None
    if world > 1:
        _shard(model, reshard, blocks, kind)
        check = ShardCheck(model, rank, world)
    losses = sharded_steps(model, _optimizer(model, kind), rank, world, check)
    state = model.state_dict()  # syncs the layers (on shards under FSDP2)
    return {
        "losses": losses,
        "state": {k: _whole(v) for k, v in state.items()},
        "checked": check and check.steps,
    }


SAVED = ("paca-uneven", "s2ft-rows-uneven", "hydra-lean")


def _shard_and_save(case: str, folder: Path) -> None:
    """A freshly patched model, sharded and saved by every rank (rank 0 writes)."""
    config, lean, _, _, overrides, _ = CASES[case]
    model = slimtune.apply(make_model("llama", **overrides), config)
    if lean:
        slimtune.lean(model)
    _shard(model, True, True, "adamw")
    slimtune.save(model, folder / case)


def _fsdp1_root_only(method: str) -> str:
    """FSDP wrapping only the root: its forward runs on views of the gathered flat parameter."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = slimtune.apply(make_model("llama"), IN_PLACE[method])
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    try:
        wrapped(input_ids=make_batch())
    except RuntimeError as err:
        return str(err)
    return ""


def _dcp_resume(case: str, rank: int, world: int, folder: Path) -> tuple[list[float], list[float]]:
    """5 steps straight, and 2 steps saved with torch.distributed.checkpoint (model and optimizer,
    sharded) and loaded into a freshly patched and sharded model that takes the other 3: the losses."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        config, _, reshard, kind, overrides, blocks = CASES[case]
        model = slimtune.apply(make_model("llama", **overrides), config)
        _shard(model, reshard, blocks, kind)
        return model, _optimizer(model, kind)

    straight = sharded_steps(*fresh(), rank, world)
    model, optimizer = fresh()
    first = sharded_steps(model, optimizer, rank, world, count=2)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / f"dcp-{case}")
    model, optimizer = fresh()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder / f"dcp-{case}")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return straight, first + sharded_steps(model, optimizer, rank, world, count=3, first_step=2)


DCP = ("paca-uneven", "s2ft-rows-uneven")


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    results = {case: _train(case, rank, world) for case in CASES}
    results |= {f"fsdp1-{method}": _fsdp1_root_only(method) for method in IN_PLACE}
    results |= {f"dcp-{case}": _dcp_resume(case, rank, world, Path(out).parent) for case in DCP}
    for case in SAVED:
        _shard_and_save(case, Path(out).parent)
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp2")
    return {**run_two_processes(_worker, folder, f"file://{folder / 'pg'}"), "folder": folder}


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


@pytest.mark.parametrize("case", [c for c in CASES if not _in_bf16(c)])
def test_fsdp2_with_two_processes_takes_the_steps_of_one(case: str, two_processes: dict) -> None:
    torch.manual_seed(0)
    one, two = _train(case, 0, 1), two_processes[case]
    assert two["checked"] == 5  # every rank's shards were exact after every step
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert one["state"].keys() == two["state"].keys()
    for key, value in one["state"].items():  # the dense weights hold the trained entries too
        torch.testing.assert_close(two["state"][key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("case", [c for c in CASES if _in_bf16(c)])
def test_fsdp2_in_bf16_keeps_the_entries_in_the_shards_and_the_masters_float32(
    case: str, two_processes: dict
) -> None:
    """Computing in bf16 (FSDP2's policy on float32 weights, or bf16 weights with float32 trained
    masters) the weight shards hold the trained entries exactly after every step (checked on each
    rank), the trained tensors stay float32, and the losses follow one process within bf16's rounding."""
    torch.manual_seed(0)
    one, two = _train(case, 0, 1), two_processes[case]
    assert two["checked"] == 5
    config = CASES[case][0]
    trained = [k for k in two["state"] if k.endswith((".paca_columns", ".s2ft_block"))]
    assert trained and all(two["state"][k].dtype == torch.float32 for k in trained), config
    assert two["losses"] == pytest.approx(one["losses"], rel=2e-2)


@pytest.mark.parametrize("method", IN_PLACE)
def test_fsdp1_wrapping_only_the_root_is_refused_with_two_processes(method: str, two_processes: dict) -> None:
    """Its forward runs on views of the gathered flat parameter (no mark on them, only on their base)."""
    assert "FSDP (torch.distributed.fsdp.FullyShardedDataParallel)" in two_processes[f"fsdp1-{method}"]


@pytest.mark.parametrize("case", DCP)
def test_a_distributed_checkpoint_resumes_the_sharded_run_exactly(case: str, two_processes: dict) -> None:
    """torch.distributed.checkpoint's sharded save and load (model and optimizer state, as torchtune
    and accelerate checkpoint FSDP2) carry the trained entries: the resumed run is the straight one."""
    straight, resumed = two_processes[f"dcp-{case}"]
    assert resumed == straight
