"""The sequential demo: pre-train a small random-init Llama on one task, then teach it a second task
with each method from the same starting point; show what each learns and what each forgets.

It is one recipe with branches (`from: pretrain`) run by the trainer, so the run folder holds the
heatmap, the loss curves and every stage's checkpoint. On a CPU it takes a few minutes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import slimtune
import yaml

from .runner import run

PRETRAIN, NEW = "copy", "digits"  # task A (the "pre-training") and task B
# Each method's options and learning rate (adapters and partial methods take larger steps).
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({"name": "full"}, 1e-3),
    "lora": ({"name": "lora", "r": 8, "alpha": 16}, 5e-3),
    "paca": ({"name": "paca", "r": 16}, 5e-3),
    "s2ft": ({"name": "s2ft", "heads": 0.25, "channels": 0.25}, 2e-2),
    "hft": ({"name": "hft"}, 1e-3),
}


def recipe(steps: int, seed: int, device: str) -> dict[str, Any]:
    """The demo recipe: `2 * steps` of pre-training on A, then `steps` on B per method."""
    schedule = {"batch_size": 16, "schedule": "cosine", "warmup_steps": 10}
    return {
        "description": f"{PRETRAIN} as pre-training, then {NEW} with each method from the same start",
        "seed": seed,
        "seq_len": 64,
        "device": device,
        "model": {"builtin": "small-llama"},
        "tasks": [
            {"name": PRETRAIN, "task": PRETRAIN, "n": 64, "stage": "pretrain"},
            {"name": NEW, "task": NEW, "n": 64, "stage": list(METHODS)},
        ],
        "stages": [
            {"name": "pretrain", "data": [{"task": PRETRAIN, "n": 2000}], "steps": 2 * steps, "lr": 1e-3}
            | schedule,
            *(
                {"name": name, "from": "pretrain", "method": method, "data": [{"task": NEW, "n": 2000}]}
                | {"steps": steps, "lr": lr}
                | schedule
                for name, (method, lr) in METHODS.items()
            ),
        ],
    }


def table(metrics: dict[str, Any], memory: str) -> str:
    """Per method: accuracy on B, retention of A (accuracy on A after B over after pre-training),
    backward transfer, median ms per step and memory."""
    acc, tasks = metrics["accuracy"], metrics["tasks"]
    a, b = tasks.index(PRETRAIN), tasks.index(NEW)
    header = f"{'method':<8}{NEW + ' acc':>12}{PRETRAIN + ' kept':>12}{'BWT':>8}{'ms/step':>10}{memory:>14}"
    lines = [header, "-" * len(header)]
    for row, (name, figures) in enumerate(zip(metrics["stages"], metrics["training"], strict=True)):
        if name not in METHODS:
            continue
        kept = acc[row][a] / acc[0][a] if acc[0][a] else float("nan")
        bwt = metrics["branches"][name]["backward_transfer"]
        lines.append(
            f"{name:<8}{acc[row][b]:>12.3f}{kept:>12.3f}{bwt:>8.3f}"
            f"{figures['ms_per_step']:>10.1f}{figures['memory_mib']:>14.2f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`slimtune demo`: write the recipe to a fresh folder, run it, print the comparison."""
    folder = Path(tempfile.mkdtemp(prefix="slimtune-demo-"))
    path = folder / "demo.yaml"
    slimtune.files.write_text(
        path, yaml.safe_dump(recipe(args.steps, args.seed, args.device.type), sort_keys=False)
    )
    result = run(path, folder / "run")
    cuda = args.device.type == "cuda"
    print(f"\n{table(result.metrics, 'peak MiB' if cuda else 'state MiB')}\n")
    if not cuda:
        print("state MiB: parameters, gradients and optimizer state (activations not counted on a CPU)")
    print(f"recipe {path}; heatmap, loss curves and checkpoints in {folder / 'run'}")
    return 0
