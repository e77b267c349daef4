"""`slimtune profile --world-size N`: the shares of each FSDP2 process (parameters, gradients and
optimizer state cut into dim-0 chunks, buffers whole) equal what rank 0 of a real 2-process FSDP2
run holds, byte for byte, for a partial method, an adapter method and full fine-tuning on an
uneven split; the profile's FSDP2 section says which numbers are a model."""

from __future__ import annotations

import pytest
import slimtune
import torch
import torch.distributed as dist
from slimtune.apps.sharded_memory import rank_share
from tiny_models import make_batch, make_model, run_two_processes

CONFIGS = {
    "paca": slimtune.PaCAConfig(r=4),
    "lora": slimtune.LoRAConfig(r=4, alpha=8),
    "full": None,
}
UNEVEN = {"intermediate_size": 87, "vocab_size": 129}  # rows that do not split evenly over 2


def _stepped(method: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make_model("llama", **UNEVEN)
    if CONFIGS[method] is not None:
        slimtune.apply(model, CONFIGS[method])
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = make_batch(batch=2, seq=8)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    held = {}
    for method in CONFIGS:
        model, _ = _stepped(method)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        _step(model, optimizer)
        params = list(model.parameters())
        held[method] = {
            "weights": _local_bytes(params) + _local_bytes(model.buffers()),
            "gradients": _local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _local_bytes(v for s in optimizer.state.values() for v in s.values()),
        }
    if rank == 0:
        torch.save(held, out)


@pytest.fixture(scope="module")
def rank_zero(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("shares")
    return run_two_processes(_worker, folder, f"file://{folder / 'pg'}")


@pytest.mark.parametrize("method", CONFIGS)
def test_the_shares_are_what_rank_zero_of_fsdp2_holds(method: str, rank_zero: dict) -> None:
    model, optimizer = _stepped(method)
    _step(model, optimizer)
    share = rank_share(model, optimizer, 2)
    held = rank_zero[method]
    assert (share.weights, share.gradients, share.optimizer) == (
        held["weights"], held["gradients"], held["optimizer"]
    )  # fmt: skip
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert whole / 2 < share.weights < whole  # half, plus padding and whole buffers


def test_the_profile_shows_the_fsdp2_section(tmp_path) -> None:
    from slimtune.apps.profile import profile

    report = profile(
        model="tiny", batch=2, seq=32, dtype="fp32", methods=["paca", "full"], out=tmp_path, world=4
    )
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows["full"]["rank"]) == {"weights", "gradients", "optimizer", "unsharded", "peak"}
    assert rows["full"]["rank"]["optimizer"] < rows["full"]["optimizer"] / 3  # a quarter, and padding
    text = (tmp_path / "profile.md").read_text()
    assert "Per process under FSDP2 with 4 processes" in text and "unsharded (model)" in text
    assert "--world-size 4" in text
    header = (tmp_path / "profile.csv").read_text().splitlines()[0]
    assert "rank_peak_gib" in header and any("FSDP2" in note for note in report["notes"])
