"""What `slimtune.sharding` prevents, measured: PaCA and S2FT without it (its hook removed), 5 AdamW steps
under FSDP2 (`fully_shard` per block and the root, 2 gloo processes, each half of a global batch of
4 rows) against 1 process on the same batches. Prints the loss difference per step and the largest
difference in the q_proj weights after the last step.

    python benchmarks/fsdp2_drift.py   (CPU, about half a minute)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import slimtune
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import make_model, sharded_steps

CONFIGS = {"paca": slimtune.PaCAConfig(r=4), "s2ft": slimtune.S2FTConfig(heads=1, channels=8)}


def steps(rank: int, world: int, init: str, out: str, method: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = slimtune.apply(make_model("llama"), CONFIGS[method])
    slimtune.state.patch_state(model).shard_hook.remove()  # slimtune.sharding off: what it prevents
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = sharded_steps(model, optimizer, rank, world)
    weights = {}
    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            weight = module.weight
            weights[name] = (
                (weight.full_tensor() if hasattr(weight, "full_tensor") else weight).detach().clone()
            )
    if rank == 0:
        torch.save({"losses": losses, "weights": weights}, out)
    dist.destroy_process_group()


def main() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    folder = Path(tempfile.mkdtemp())
    for method in CONFIGS:
        steps(0, 1, f"file://{folder / (method + '-pg1')}", str(folder / "one.pt"), method)
        mp.spawn(
            steps, args=(2, f"file://{folder / (method + '-pg2')}", str(folder / "two.pt"), method), nprocs=2
        )
        one, two = torch.load(folder / "one.pt"), torch.load(folder / "two.pt")
        drift = [abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)]
        weights = max(float((one["weights"][k] - two["weights"][k]).abs().max()) for k in one["weights"])
        print(f"{method}: loss |2 proc - 1 proc| per step {', '.join(f'{d:.1e}' for d in drift)}; "
              f"q_proj weights max |diff| {weights:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
