"""`slimtune demo`: teach a real pretrained model one new task with each method, from the same base,
and show what each learns and what each forgets of what the base knew.

The model is the built-in SmolLM2-135M-Instruct (`slimtune.models`); the new task is `swap` ("zq: w1
w2 w3" -> "w3 w1", which the base never answers). Every method trains from the base (`from: base`)
on the same data. Each method takes a round rate near where the quality benchmark's search found
it at 80% learned on its three tasks (geometric mean over the seeds that reach 80%: full 2.6e-4,
four seeds of four, and HFT 2.8e-4, three of four: 2.5e-4; PaCA 3.3e-3, two of four: 3e-3; LoRA
2.2e-3, two of three: 2e-3; S2FT 1.1e-2, one of three: 1e-2;
benchmarks/results/quality-smollm2-135m-cpu). After each, the trainer measures the new
task's held-out accuracy, the share of 64 general-knowledge questions the base answers that are
still answered (whole-word match; ten categories), and the per-token NLL change on English prose
(drift). The data ship with slimtune (`demo_data/`, made by the benchmark's preparation). About 4
minutes on 2 idle CPU cores; it says so, and where its run goes, before it starts, and shows
progress at least every 30 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import slimtune
import torch
import yaml

from .runner import run

MODEL = "smollm2-135m"
DATA = Path(__file__).resolve().parent / "demo_data"
# Options and the learning rate each method gets (from the quality benchmark; see the module docstring).
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({"name": "full"}, 2.5e-4),
    "lora": ({"name": "lora", "r": 16, "alpha": 32}, 2e-3),
    "paca": ({"name": "paca", "r": 32}, 3e-3),
    "s2ft": ({"name": "s2ft", "heads": 1, "channels": 64}, 1e-2),
    "hft": ({"name": "hft"}, 2.5e-4),
}


def recipe(steps: int, seed: int, device: str) -> dict[str, Any]:
    """One stage per method, each from the base model."""
    return {
        "description": f"{MODEL}: the swap task with each method from the same base",
        "seed": seed,
        "seq_len": 64,
        "device": device,
        "model": {"builtin": MODEL},
        "tasks": [
            {"name": "swap", "path": str(DATA / "swap-eval.jsonl"), "stage": list(METHODS)},
            {
                "name": "knowledge",
                "path": str(DATA / "probes.jsonl"),
                "match": "word",
                "max_new_tokens": 12,
            },
            {"name": "prose", "path": str(DATA / "text.jsonl")},
        ],
        "stages": [
            {
                "name": name,
                "from": "base",
                "method": method,
                "data": [{"path": str(DATA / "swap-train.jsonl")}],
                "steps": steps,
                "batch_size": 8,
                "lr": lr,
                "schedule": "cosine",
                "warmup_steps": 2,
                "weight_decay": 0.0,
            }
            for name, (method, lr) in METHODS.items()
        ],
    }


def table(metrics: dict[str, Any], memory: str) -> str:
    """Per method: the new task's accuracy, knowledge kept (probes still answered over the base's),
    prose NLL drift (per token), median ms per step and memory."""
    tasks, acc, loss = metrics["tasks"], metrics["accuracy"], metrics["loss"]
    swap, probes, prose = (tasks.index(t) for t in ("swap", "knowledge", "prose"))
    base_acc, base_loss = metrics["base"]["accuracy"], metrics["base"]["loss"]
    header = (
        f"{'method':<8}{'lr':>8}{'swap acc':>10}{'knowledge kept':>16}{'prose NLL drift':>17}"
        f"{'ms/step':>9}{memory:>11}"
    )
    lines = [header, "-" * len(header)]
    for row, (name, figures) in enumerate(zip(metrics["stages"], metrics["training"], strict=True)):
        kept = acc[row][probes] / base_acc[probes] if base_acc[probes] else float("nan")
        drift = loss[row][prose] - base_loss[prose]
        lines.append(
            f"{name:<8}{METHODS[name][1]:>8.1e}{acc[row][swap]:>10.3f}{kept:>16.3f}{drift:>+17.3f}"
            f"{figures['ms_per_step']:>9.0f}{figures['memory_mib']:>11.0f}"
        )
    return "\n".join(lines)


def _folder(output: str | None) -> Path:
    """The folder asked for (the CLI checked it is new or empty), else a fresh temporary one, kept."""
    if output is None:
        return Path(tempfile.mkdtemp(prefix="slimtune-demo-"))
    Path(output).mkdir(parents=True, exist_ok=True)
    return Path(output)


def _pin_threads() -> int:
    """Torch's CPU threads: one per core this process may run on (its affinity, not the host's count),
    unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def main(args: argparse.Namespace) -> int:
    """`slimtune demo`: write the recipe to a fresh folder, run it, print the comparison."""
    if not slimtune.models.is_available(MODEL):
        print(
            f"slimtune demo: the built-in model {MODEL} is not installed: {slimtune.models.INSTALL}",
            file=sys.stderr,
        )
        return 2
    folder = _folder(args.output)
    threads = _pin_threads()
    steps = f"{args.steps} step{'s' if args.steps != 1 else ''}"
    print(
        f"slimtune demo: the built-in {MODEL} (SmolLM2-135M-Instruct) learns the swap task with "
        f"{', '.join(METHODS)}, {steps} each from the base, on {args.device.type} ({threads} "
        f"threads); about 4 minutes at 16 steps on 2 idle CPU cores, longer on a loaded machine. Recipe "
        f"and run: {folder}",
        file=sys.stderr,
        flush=True,
    )
    path = folder / "demo.yaml"
    slimtune.files.write_text(
        path, yaml.safe_dump(recipe(args.steps, args.seed, args.device.type), sort_keys=False)
    )
    result = run(path, folder / "run")
    cuda = args.device.type == "cuda"
    print(f"\n{MODEL}, {steps} of the swap task with each method from the same base:\n")
    print(f"{table(result.metrics, 'peak MiB' if cuda else 'state MiB')}\n")
    print(
        "knowledge kept: general questions the base answered correctly that are still answered; prose NLL "
        "drift: change of the per-token loss on English prose (lower is better)"
    )
    if not cuda:
        print("state MiB: parameters, gradients and optimizer state (activations not counted on a CPU)")
    print(f"recipe {path}; heatmap (forgetting.png), loss curves and checkpoints in {folder / 'run'}")
    return 0
