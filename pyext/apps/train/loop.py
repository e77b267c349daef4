"""One stage's optimisation: AdamW, warmup then decay, gradient accumulation, DDP or FSDP2,
progress and step logs.

The loss of a step is the summed token loss of the whole global batch over its label count, so
one process and N processes (each with a slice of the batch) take the same gradient steps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import slimtune
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .data import Packed
from .step_log import StepRecord, StepSink
from .tasks import token_loss_sum

if TYPE_CHECKING:  # annotations only: the recipe imports FPF's settings, whose step runs this loop
    from .recipe import Stage

log = logging.getLogger("slimtune.train")


DDP, FSDP2 = "ddp", "fsdp2"  # how a stage's training is spread over the processes (`distributed`)


@dataclass(frozen=True)
class World:
    """This process's place in a `torchrun` launch (rank 0 of 1 without one), its device, and how
    training is spread over the processes (DDP, or FSDP2 shards)."""

    rank: int
    size: int
    device: torch.device
    strategy: str = DDP
    owns_group: bool = False  # this World started the process group (and so ends it)

    @classmethod
    def start(cls, device: str, strategy: str = DDP) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        local = int(os.environ.get("LOCAL_RANK", "0"))
        owns = size > 1 and not dist.is_initialized()
        if owns:
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo")
        place = torch.device(f"cuda:{local}" if cuda else "cpu")
        return cls(int(os.environ.get("RANK", "0")), size, place, strategy, owns)

    def close(self) -> None:
        """After a finished run: every rank waits for the others, then the group this World started
        is destroyed while the interpreter is alive (a gloo group left to exit-time teardown can
        abort the process, pytorch/pytorch#190489). A group the caller started stays theirs."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def sharded(self) -> bool:
        """Whether this launch trains FSDP2 shards (more than one process, `distributed: fsdp2`)."""
        return self.size > 1 and self.strategy == FSDP2

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


@dataclass
class Trace:
    """What a stage's training recorded: loss per step, milliseconds per step, memory."""

    losses: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    memory_mib: float = 0.0


def lr_factor(stage: Stage, steps: int, step: int) -> float:
    """Linear warmup over `warmup_steps`, then constant, linear or cosine decay to 0 at the last step."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(steps - stage.warmup_steps, 1)
    if stage.schedule == "linear":
        return 1.0 - progress
    if stage.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_optimizer(params: list[nn.Parameter], stage: Stage) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)


def memory_mib(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Peak CUDA memory; on a CPU, the bytes of parameters, gradients and optimizer state this
    process holds (its shards under FSDP2; no activations)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    params = list(model.parameters())
    tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(slimtune.sharding.local(t).numel() * t.element_size() for t in tensors) / 2**20


def grad_norm(params: list[nn.Parameter], world: World | None = None) -> float:
    """The L2 norm of every gradient together (after DDP's averaging), as clip_grad_norm_ reports it;
    of FSDP2 shards, summed over the processes (a collective: every rank calls it)."""
    grads = [slimtune.sharding.local(p.grad).float() for p in params if p.grad is not None]
    square = sum((g.square().sum() for g in grads), torch.zeros(()))
    if world is not None and world.sharded:
        dist.all_reduce(square)
    return float(square.sqrt())


@contextlib.contextmanager
def parallel(model: nn.Module, params: list[nn.Parameter], world: World) -> Iterator[tuple[nn.Module, list]]:
    """The module to train and its parameters to optimise: the model itself (one process), the model
    in DistributedDataParallel, or under FSDP2 a copy sharded block by block (`fully_shard`), whose
    trained state is gathered back into the model after training. The model waits on the CPU
    meanwhile, so the device holds only the shards."""
    if world.size == 1:
        yield model, params
    elif not world.sharded:
        yield nn.parallel.DistributedDataParallel(model), params
    else:
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in model.named_parameters()}
        net = copy.deepcopy(model.to("cpu"))
        for _, blocks in slimtune.architectures.block_stacks(net):
            for block in blocks:
                fully_shard(block)
        fully_shard(net)
        net.to(world.device)
        log.info(
            "training FSDP2 shards: each of %d processes holds 1/%d of every block", world.size, world.size
        )
        yield net, [net.get_parameter(names[id(p)]) for p in params]
        state = net.state_dict()  # a collective: every rank gathers every tensor, in the same order
        model.load_state_dict(
            {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
        )
        model.to(world.device)


def _accumulating(net: nn.Module, world: World, last: bool) -> contextlib.AbstractContextManager:
    """Gradients of a micro-batch that is not the step's last stay on this process (no reduction)."""
    if world.size == 1:
        return contextlib.nullcontext()
    if world.sharded:
        net.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else net.no_sync()


def _report(record: StepRecord, sinks: Sequence[StepSink], line: str | None) -> None:
    """The step to every sink, and to the log (`line`: where the step is; None: not a logged step)."""
    for sink in sinks:
        sink.write(record)
    if line is not None:
        log.info(
            "%s, loss %.4f, lr %.3g, grad norm %.4g, %.0f tokens/s, %.0f ms/step",
            line, record.loss, record.lr, record.grad_norm, record.tokens_per_s, record.ms,
        )  # fmt: skip


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    packed: Packed,
    order: Tensor,
    stage: Stage,
    steps: int,
    world: World,
    trace: Trace,
    after_step: Callable[[int], None] | None = None,
    sinks: Sequence[StepSink] = (),
) -> None:
    """`steps` optimizer steps on the rows `order` lists, `stage.batch_size` rows per step;
    `after_step(n)` runs after the n-th step (k-FPF), with the gradients cleared; every step's
    figures go to `sinks` (on rank 0)."""
    if world.size > 1:  # dropout masks differ across ranks, as across the rows of one process; the data
        torch.manual_seed(torch.initial_seed() + world.rank)  # order and method init were drawn alike
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    # On a terminal a bar updates in place; otherwise (a log, CI) a short line every tenth of the stage.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=steps, desc=stage.name, disable=world.rank != 0 or not interactive, dynamic_ncols=True)
    with parallel(model, params, world) as (net, trained):
        optimizer = make_optimizer(trained, stage)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(stage, steps, step))
        net.train()
        for step in range(steps):
            started = time.perf_counter()
            rows = order[step * stage.batch_size : (step + 1) * stage.batch_size]
            count = max(int((packed.labels[rows, 1:] != -100).sum()), 1)
            total = _step_gradients(net, packed, rows, count, stage, world)
            logged = not interactive and world.rank == 0 and every_tenth(steps, step)
            recorded = world.rank == 0 and (logged or bool(sinks))
            lr = optimizer.param_groups[0]["lr"]
            norm = grad_norm(trained, world) if recorded or world.sharded else 0.0
            optimizer.step()
            schedule.step()
            if step == 0:
                trace.memory_mib = memory_mib(net, optimizer, world.device)
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(step + 1)
            if world.size > 1:
                dist.all_reduce(total)
            trace.losses.append(float(total) / count)
            trace.ms.append((time.perf_counter() - started) * 1e3)
            bar.set_postfix(loss=f"{trace.losses[-1]:.4f}")
            bar.update()
            if recorded:
                tokens = int(packed.mask[rows].sum()) / (trace.ms[-1] / 1e3)
                record = StepRecord(len(trace.losses), trace.losses[-1], lr, norm, tokens, trace.ms[-1])
                _report(record, sinks, f"stage {stage.name}: step {step + 1}/{steps}" if logged else None)
    bar.close()
    model.eval()


def every_tenth(steps: int, step: int) -> bool:
    """Whether step `step` (0-based) ends a tenth of the stage, or the stage: a logged step off a terminal."""
    return (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps


def _step_gradients(
    net: nn.Module, packed: Packed, rows: Tensor, count: int, stage: Stage, world: World
) -> Tensor:
    """This process's share of the step's rows, in `grad_accum` micro-batches: their gradients
    (reduced over the processes with the last one) and their summed token loss."""
    share = stage.batch_size // world.size
    mine = rows[world.rank * share : (world.rank + 1) * share].view(stage.grad_accum, -1)
    total = torch.zeros((), device=world.device)
    for i, part in enumerate(mine):
        with _accumulating(net, world, last=i == stage.grad_accum - 1):
            ids, labels, mask = (t[part].to(world.device) for t in (packed.ids, packed.labels, packed.mask))
            loss = token_loss_sum(net, ids, labels, mask)
            (loss * world.size / count).backward()  # DDP and FSDP2 average over processes
        total += loss.detach()
    return total
