"""Tiny random-init Hugging Face models of several families, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

COMMON = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 88,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v projections with bias
    "qwen3": ("Qwen3Config", {"head_dim": 24}),  # per-head q/k norms, head_dim != hidden/heads
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 24}),  # head_dim != hidden/heads, GeGLU
    "phi3": (
        "Phi3Config",
        {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    ),  # fused qkv_proj and gate_up_proj
}


def make_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> torch.nn.Module:
    """A CausalLM of `family` with random weights drawn from `seed`."""
    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(dtype).eval()


def make_batch(
    vocab_size: int = COMMON["vocab_size"], batch: int = 3, seq: int = 11, seed: int = 1
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def sharded_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world: int,
    after_step=None,
    count: int = 5,
    first_step: int = 0,
) -> list[float]:
    """`count` optimizer steps (from step `first_step` of the sequence) on a global batch of 4 rows of
    10 tokens (seeded per step), each of `world` processes on its slice; the mean loss of each step
    over the processes (all-reduced when world > 1). `after_step()` runs after each optimizer step."""
    losses = []
    for step in range(first_step, first_step + count):
        ids = make_batch(batch=4, seq=10, seed=20 + step)
        part = ids[rank * 4 // world : (rank + 1) * 4 // world]
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _rank_main(rank: int, worker, world: int, *args) -> None:
    """One rank: the worker, then the teardown every rank needs. Both ranks meet at a barrier and
    destroy the process group while the interpreter is alive: a rank that leaves a gloo group
    undestroyed, or leaves before the other is done, can abort at exit ("terminate called without
    an active exception", pytorch/pytorch#190489), seen under load in accelerate's and FSDP's tests."""
    import torch.distributed as dist

    worker(rank, world, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_two_processes(worker, folder, *args):
    """`worker(rank, 2, *args, out)` in 2 processes, one thread each; what rank 0 saved to `out`
    (a file in `folder`) with torch.save. The worker may leave its process group initialized:
    `_rank_main` tears it down."""
    import os

    import torch.multiprocessing as mp

    out = folder / "rank0.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(worker, 2, *args, str(out)), nprocs=2)
    return torch.load(out)


def free_port() -> int:
    """A free local port for a rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stepped_losses(model, backward, step, rank: int, world: int) -> list[float]:
    """`sharded_steps` for an engine that owns its backward and step (DeepSpeed, accelerate)."""
    losses = []
    for number in range(5):
        ids = make_batch(batch=4, seq=10, seed=20 + number)
        part = ids[rank * 4 // world : (rank + 1) * 4 // world]
        loss = model(input_ids=part, labels=part).loss
        backward(loss)
        step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses
