"""Intruder dimensions of the quality benchmark's runs, beside their retention and target accuracy.

    python benchmarks/quality_intruders.py --out WORK --results RESULTS

For each method's runs in the matched-target tables of `quality.py` (the best retention at >= 90%
and at >= 50% target), the final model is rebuilt from the run folder's stage checkpoints, as
`slimtune train --resume` restores them (LiNeS is redone from the stage's start), and
`slimtune.diagnostics.intruder_dimensions(base, final, k=10, threshold=0.5)` counts, over every
linear of the blocks, the final weight's top-10 singular vectors with no base singular vector within
cosine 0.5. Runs whose last operation is FPF or a graft are left out (the model after them is not in
the checkpoints; rebuilding it means training again), and so are runs whose dense checkpoints are
gone, unless `--checkpoints` names a folder of deterministic reruns that kept them. Writes
`intruders.csv` and `intruders.md`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
from pathlib import Path

import slimtune
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402

K, THRESHOLD = 10, 0.5


def rebuild(folder: Path, recipe_path: Path):
    """The run's final model: the base with every stage's checkpoint restored, LiNeS redone (None,
    and why, where it cannot be rebuilt)."""
    from slimtune.apps.train import load_recipe, models
    from slimtune.apps.train.runner import stage_folder

    recipe = load_recipe(recipe_path)
    model, _ = models.build(recipe.model, recipe.seed)
    for index, stage in enumerate(recipe.stages):
        if any(op.name in ("fpf", "graft") for op in stage.post):
            return None, "ends in FPF or a graft"
        checkpoint = stage_folder(folder, index, stage.name)
        if not any(checkpoint.rglob("*.safetensors")):
            return None, "dense checkpoints not kept"
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        method = stage.method()
        method.restore(model, checkpoint)
        for op in stage.post:
            if op.name == "lines":
                slimtune.toolbox.lines.scale(model, before, op.alpha, op.beta)
    return model, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the benchmark's work folder")
    parser.add_argument("--results", type=Path, required=True, help="its results folder (runs.json)")
    parser.add_argument(
        "--checkpoints", type=Path, nargs="*", default=[],
        help="folders of deterministic reruns (same recipes) that kept the dense checkpoints",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    import slimtune
    from slimtune.apps.train import load_recipe, models

    rows = json.loads((args.results / "runs.json").read_text())["runs"]
    chosen = {}
    for threshold in (0.9, 0.5):
        for method, row in quality.matched(rows, threshold).items():
            if row is not None:
                chosen.setdefault((method, row["lr"], row["seed"]), (row, []))[1].append(f">={threshold:.0%}")
    base = None
    table = []
    for (method, lr, seed), (row, tables) in chosen.items():
        tag = f"{method}-lr{lr:g}-seed{seed}"
        recipe_path = args.out / f"{tag}.yaml"
        if base is None:
            recipe = load_recipe(recipe_path)
            base, _ = models.build(recipe.model, recipe.seed)
        with torch.no_grad():
            for folder in [args.out / "runs" / tag, *(c / tag for c in args.checkpoints)]:
                final, why = rebuild(folder, recipe_path)  # the run's folder, then reruns that kept them
                if final is not None or why != "dense checkpoints not kept":
                    break
            counts = (
                None if final is None else slimtune.diagnostics.intruder_dimensions(base, final, K, THRESHOLD)
            )
        total = None if counts is None else sum(counts.values())
        table.append({
            "method": method, "lr": lr, "seed": seed, "tables": " ".join(tables), "target": row["target"],
            "probe_retention": row["probe_retention"], "intruders": total,
            "matrices": None if counts is None else len(counts), "not_rebuilt": why,
        })  # fmt: skip
        print(f"intruders: {tag}: {total}", flush=True)
    with (args.results / "intruders.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [
        "# Intruder dimensions of the matched runs",
        "",
        f"Command: `python benchmarks/quality_intruders.py {' '.join(argv or sys.argv[1:])}`  ",
        f"Date: {datetime.date.today().isoformat()}; versions: "
        + ", ".join(f"{k} {v}" for k, v in quality.versions().items()),
        "",
        f"Per run: the total, over the {table[0]['matrices'] or 'targeted'} linears of the blocks, of the "
        f"final weight's top-{K} left singular vectors with no base singular vector within |cosine| "
        f"{THRESHOLD} (`slimtune.diagnostics.intruder_dimensions`). Not rebuilt (-): runs ending in FPF "
        "or a graft, and runs whose dense stage checkpoints were deleted for disk space.",
        "",
        "| method | lr | seed | matched at | target | probe retention | intruder dimensions |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        count = f"- ({r['not_rebuilt']})" if r["intruders"] is None else str(r["intruders"])
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['seed']} | {r['tables']} | {r['target']:.2f} "
            f"| {r['probe_retention']:.2f} | {count} |"
        )
    (args.results / "intruders.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
