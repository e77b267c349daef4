"""`slimtune demo --single-task`: PaCA, full fine-tuning and PEFT LoRA side by side on a tiny Llama.

The task is generated, so nothing is downloaded: after LENGTH random symbols and a separator, write
each symbol's successor (x + 1 mod SYMBOLS) in the same order. Only the answer tokens carry loss, so
a model that has learned nothing scores ln(SYMBOLS) and one that has learned the task scores near 0.
The LM head stays frozen for PaCA and LoRA, and a frozen random head bounds the logits by about
0.02 x hidden size, hence a hidden size of 256 (at 128 those methods stall near a loss of 0.8).
Each method trains in a fresh process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch

from . import progress
from .bench import METHODS, MethodOptions, build_model, count_trainable, timed, train_step

SYMBOLS, LENGTH, BATCH, HELD_OUT = 32, 8, 32, 512
SEPARATOR = SYMBOLS  # the one extra token
MODEL = {
    "vocab_size": SYMBOLS + 1,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2 * LENGTH + 1,
}
DEMO_METHODS = ("paca", "full", "peft-lora")
# PaCA r=16 trains 16 columns per linear, about LoRA r=8's parameter count (8 x (in + out)).
OPTIONS = MethodOptions(paca_r=16, lora_r=8, lr=3e-3)


def make_batch(generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
    """`x_1 .. x_n SEP x_1+1 .. x_n+1` (mod SYMBOLS), with loss on the answer half only."""
    x = torch.randint(0, SYMBOLS, (size, LENGTH), generator=generator)
    ids = torch.cat([x, torch.full((size, 1), SEPARATOR), (x + 1) % SYMBOLS], dim=1)
    labels = ids.clone()
    labels[:, : LENGTH + 1] = -100
    return {"input_ids": ids, "labels": labels}


@dataclass
class Result:
    method: str
    trainable: int
    loss: float
    ms_per_step: float
    peak_mib: float


def _rss_mib() -> float:
    """Current resident set size (Linux /proc), the baseline for the peak-RSS growth."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return model(**batch).loss.item()


def train(method: str, steps: int, device_name: str, seed: int) -> Result:
    """Fine-tune one method from the seeded model on the seeded data stream (runs in a child process)."""
    device = torch.device(device_name)
    model = build_model(MODEL, device, torch.float32, seed)
    model, optimizer = METHODS[method](model, replace(OPTIONS, seed=seed))
    data = torch.Generator().manual_seed(seed + 2)
    bar = progress.bar(steps, method)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_mib()
    for _ in range(steps):
        batch = _to(make_batch(data, BATCH), device)
        loss, ms = timed(functools.partial(train_step, model, optimizer, batch), device)
        times.append(ms)
        bar.set_postfix_str(f"loss {loss.item():.3f}")
        bar.update()
    bar.close()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _peak_rss_mib() - rss_before
    held_out = _to(make_batch(torch.Generator().manual_seed(seed + 1), HELD_OUT), device)
    return Result(method, count_trainable(model), _loss(model, held_out), statistics.median(times), peak)


def table(results: list[Result], device: torch.device) -> str:
    peak = "peak CUDA MiB" if device.type == "cuda" else "peak RSS growth (MiB)"
    header = f"{'method':<10} {'trainable':>10} {'final loss':>10} {'ms/step':>8} {peak:>22}"
    lines = [header, "-" * len(header)]
    for r in results:
        loss, ms, peak_mib = f"{r.loss:.3f}", f"{r.ms_per_step:.1f}", f"{r.peak_mib:.1f}"
        lines.append(f"{r.method:<10} {r.trainable:>10,} {loss:>10} {ms:>8} {peak_mib:>22}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    device: torch.device = args.device
    print(
        f"slimtune demo: write the successor of each of {LENGTH} symbols (of {SYMBOLS}); random-init Llama, "
        f"{MODEL['num_hidden_layers']} layers x {MODEL['hidden_size']}; {args.steps} AdamW steps (lr "
        f"{OPTIONS.lr}) of {BATCH} sequences per method on {device}; loss on the answer only "
        f"(chance = ln {SYMBOLS} = {math.log(SYMBOLS):.2f})",
        flush=True,
    )
    start = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    results = []
    for method in DEMO_METHODS:
        # A fresh process per method, so its peak memory is its own; `with` lets it exit cleanly.
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            results.append(pool.submit(train, method, args.steps, str(device), args.seed).result())
    print(table(results, device))
    total = time.perf_counter() - start
    print(
        f"(final loss: on {HELD_OUT} held-out sequences, chance {math.log(SYMBOLS):.2f}; ms/step: median; "
        f"total {total:.0f} s)"
    )
    return 0
