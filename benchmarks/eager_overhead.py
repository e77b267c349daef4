"""Eager per-layer cost of one PaCA and one LoRA layer (forward, backward, SGD step, zero_grad: one
training step, so the trained entries are written back as in training) on CPU, for
comparing two slimtune trees (e.g. before and after a change to the op dispatch).

    python benchmarks/eager_overhead.py TREE [TREE ...] [--out FILE]

TREE is a repository checkout whose `pyext/` holds a built `slimtune._C` (copy the .so in). One
thread, medians of 30 calls after 5 warm-up calls. A CPU time, never a GPU result.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(8, 64, 64), (512, 1024, 1024)]  # (tokens, in, out)


def measure(tree: Path) -> dict[str, float]:
    spec = importlib.util.spec_from_file_location(
        "slimtune", tree / "pyext" / "__init__.py", submodule_search_locations=[str(tree / "pyext")]
    )
    slimtune = importlib.util.module_from_spec(spec)
    sys.modules["slimtune"] = slimtune
    spec.loader.exec_module(slimtune)
    import torch

    torch.set_num_threads(1)
    results = {}
    for method, config in (
        ("paca", lambda: slimtune.PaCAConfig(r=4, target_modules=["0"])),
        ("lora", lambda: slimtune.LoRAConfig(r=4, alpha=8, target_modules=["0"])),
    ):
        for n, k, m in SHAPES:
            model = torch.nn.Sequential(torch.nn.Linear(k, m, bias=False))
            slimtune.apply(model, config())
            x = torch.randn(n, k, requires_grad=True)
            optimizer = torch.optim.SGD(slimtune.trainable_parameters(model), lr=1e-3)
            times = []
            for _ in range(35):
                start = time.perf_counter()
                model(x).sum().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            results[f"{method} {n}x{k}->{m}"] = statistics.median(times[5:]) * 1e6
    return results


def _commit(tree: Path) -> str:
    run = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return run.stdout.strip() or "not a git checkout"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if len(args.trees) > 1:  # each tree in its own interpreter: two packages named slimtune cannot coexist
        columns = []
        for tree in args.trees:
            run = subprocess.run(
                [sys.executable, __file__, str(tree)], capture_output=True, text=True, check=True
            )
            columns.append(dict(line.split("\t") for line in run.stdout.strip().splitlines()))
        import torch

        lines = [
            "# Eager per-layer training step, forward + backward + SGD step + zero_grad (CPU, one thread;"
            " not a GPU result)",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; machine: "
            f"{platform.machine()} ({platform.processor() or 'cpu'}), torch {torch.__version__}",
            f"- command: `python benchmarks/eager_overhead.py {' '.join(str(t) for t in args.trees)}`",
            "- median of 30 calls after 5 warm-up calls, microseconds",
            "",
            "| layer | " + " | ".join(f"{t} ({_commit(t)})" for t in args.trees) + " |",
            "|---|" + "---|" * len(args.trees),
            *(
                f"| {key} | " + " | ".join(f"{float(c[key]):.0f}" for c in columns) + " |"
                for key in columns[0]
            ),
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    for key, us in measure(args.trees[0]).items():
        print(f"{key}\t{us}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
