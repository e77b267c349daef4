"""Sharding engines: PaCA and S2FT refuse FSDP2, FSDP and DeepSpeed ZeRO-3 at their first forward
(they would train silently wrong), naming the engine and what works; LoRA under FSDP2 with 2 gloo
processes takes the steps of one process; DDP and a merged model are not refused."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import slimtune
import torch
import torch.distributed as dist
from tiny_models import make_batch, make_model

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


@pytest.mark.parametrize("wrap", ["blocks and root", "root only", "one layer"])
@pytest.mark.parametrize("method", IN_PLACE)
def test_in_place_methods_refuse_fsdp2(method, wrap, one_process) -> None:
    from torch.distributed.fsdp import fully_shard

    model = slimtune.apply(make_model("llama"), IN_PLACE[method])
    if wrap == "one layer":
        fully_shard(model.model.layers[0].mlp.down_proj)
    else:
        if wrap == "blocks and root":
            for block in model.model.layers:
                fully_shard(block)
        fully_shard(model)
    _refused(model, r"FSDP2 \(torch\.distributed\.fsdp\.fully_shard\)")


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


def test_plain_merged_and_copied_models_are_not_refused() -> None:
    model = slimtune.apply(make_model("llama"), IN_PLACE["paca"])
    model(input_ids=make_batch())  # no engine
    copy.deepcopy(model)(input_ids=make_batch())
    merged = slimtune.merge(model)
    assert not merged._forward_pre_hooks
    for number, parameter in enumerate(merged.parameters()):
        parameter.ds_id = number
    merged(input_ids=make_batch())  # a plain model again: any engine may shard it


def _lora_steps(rank: int, world: int, init: str, out: str) -> None:
    """3 AdamW steps of a LoRA model on a global batch of 4 rows (each rank its slice); the losses and
    final adapter weights to `out`."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = slimtune.apply(make_model("llama"), slimtune.LoRAConfig(r=4, alpha=8))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(3):
        ids = make_batch(batch=4, seq=10, seed=20 + step)
        share = ids.shape[0] // world
        loss = model(
            input_ids=ids[rank * share : (rank + 1) * share], labels=ids[rank * share : (rank + 1) * share]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            weights[name] = full.detach().clone()
    if rank == 0:
        torch.save({"losses": losses, "weights": weights}, out)
    dist.destroy_process_group()


def test_lora_under_fsdp2_takes_the_steps_of_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _lora_steps(0, 1, f"file://{tmp_path / 'one'}", str(tmp_path / "one.pt"))
    mp.spawn(_lora_steps, args=(2, f"file://{tmp_path / 'two'}", str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert one["weights"].keys() == two["weights"].keys()
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-5, atol=1e-5, msg=name)
