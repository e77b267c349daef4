"""Forgetting metrics from the accuracy matrix, and the run's plots and summary table.

a[j][i] is the accuracy on task i after stage j (j = 0 .. T-1, the stages of one branch). With s(i)
the stage that teaches task i (its `stage` key), and tasks learned in the last stage left out of
BWT and of the average forgetting:
    average accuracy  ACC = mean_i a[T-1][i]
    backward transfer BWT = mean_i (a[T-1][i] - a[s(i)][i])      over tasks with s(i) < T-1
    forgetting        f_i = max_{j < T-1} a[j][i] - a[T-1][i]     (T > 1), averaged likewise
Tasks without answers (plain text) have loss only and take no part in these.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from statistics import mean
from typing import Any

import slimtune

Matrix = list[list[float | None]]


def forgetting(acc: Matrix, tasks: list[str], learned: list[int | None]) -> dict[str, Any]:
    """ACC, BWT and per-task forgetting from `acc` (rows: stages, columns: tasks)."""
    last = len(acc) - 1
    scored = [i for i, value in enumerate(acc[-1]) if value is not None]
    before_last = [i for i in scored if learned[i] is None or learned[i] < last]
    per_task = {
        tasks[i]: max(acc[j][i] for j in range(last)) - acc[last][i] if last > 0 else None for i in scored
    }
    bwt = [acc[last][i] - acc[learned[i]][i] for i in before_last if learned[i] is not None]
    averaged = [per_task[tasks[i]] for i in before_last if per_task[tasks[i]] is not None]
    return {
        "average_accuracy": mean(acc[last][i] for i in scored) if scored else None,
        "average_accuracy_per_stage": [mean(row[i] for i in scored) if scored else None for row in acc],
        "backward_transfer": mean(bwt) if bwt else None,
        "forgetting": per_task,
        "average_forgetting": mean(averaged) if averaged else None,
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(
    rows: list[str], tasks: list[str], acc: Matrix, loss: Matrix, branches: dict[str, dict[str, Any]]
) -> str:
    """The summary printed at the end: accuracy (loss for tasks without answers) per stage and task,
    then ACC, BWT and forgetting per branch (one line for a linear recipe)."""
    header = ["after", *[f"{t} {'acc' if acc[-1][i] is not None else 'loss'}" for i, t in enumerate(tasks)]]
    body = [
        [row, *[_cell(a if a is not None else lo) for a, lo in zip(acc[j], loss[j], strict=True)]]
        for j, row in enumerate(rows)
    ]
    widths = [max(len(line[k]) for line in [header, *body]) for k in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in [header, *body]
    ]
    for name, report in branches.items():
        lines.append(
            (f"branch {name}: " if len(branches) > 1 else "")
            + f"average accuracy {_cell(report['average_accuracy'])}   "
            f"backward transfer {_cell(report['backward_transfer'])}   "
            f"average forgetting {_cell(report['average_forgetting'])}"
        )
    return "\n".join(lines)


def heatmap(
    rows: list[str], tasks: list[str], acc: Matrix, path: Path, loss: Matrix | None = None, title: str = ""
) -> None:
    """The accuracy matrix as a heatmap PNG, one row per stage (and the base model); a task without
    answers (plain text, loss-only) shows its loss in grey cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [[float("nan") if v is None else v for v in row] for row in acc]
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    fig, ax = plt.subplots(figsize=(2.2 + 1.2 * len(tasks), 1.6 + 0.5 * len(rows)))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("task")
    ax.set_ylabel("after stage")
    ax.set_title(
        textwrap.fill(title or "accuracy after each stage (grey: loss of tasks without answers)", 56),
        fontsize=9,
    )
    for j, row in enumerate(acc):
        for i, value in enumerate(row):
            if value is None:
                text, color = ("loss\n" + _cell(loss[j][i])) if loss is not None else "-", "black"
            else:
                text, color = _cell(value), "white" if value < 0.6 else "black"
            ax.text(i, j, text, ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    slimtune.files.write_with(path, lambda partial: fig.savefig(partial, dpi=120))
    plt.close(fig)


def loss_curves(
    stages: list[str],
    losses: list[list[float]],
    path: Path,
    parents: list[int] | None = None,
    title: str = "",
) -> None:
    """Training loss per step. Each stage starts where the stage it continues from ended (`parents[j]`,
    -1 for the base model), so parallel branches are drawn side by side, not end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parents = parents if parents is not None else list(range(-1, len(stages) - 1))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ends: list[int] = []
    for j, (name, curve) in enumerate(zip(stages, losses, strict=True)):
        start = ends[parents[j]] if parents[j] >= 0 else 0
        ax.plot(range(start, start + len(curve)), curve, label=name)
        ends.append(start + len(curve))
    ax.set_xlabel("step (a stage starts where the model it continues from ended)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(textwrap.fill(title or "training loss per stage", 80), fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    slimtune.files.write_with(path, lambda partial: fig.savefig(partial, dpi=120))
    plt.close(fig)


def intruder_summary(stages: list[str], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: the total intruder dimensions, per block (by the first number in a module name)
    and per module (the stage's `intruders` record)."""
    out = {}
    for name, record in zip(stages, records, strict=True):
        counts = record.get("intruders") or {}
        blocks: dict[int, int] = {}
        for module, count in counts.items():
            found = re.search(r"\.(\d+)\.", module)
            if found:
                blocks[int(found[1])] = blocks.get(int(found[1]), 0) + count
        per_block = [blocks.get(i, 0) for i in range(max(blocks, default=-1) + 1)]
        out[name] = {"total": sum(counts.values()), "per_block": per_block, "per_module": counts}
    return out


def intruder_plot(summary: dict[str, Any], path: Path, title: str = "") -> None:
    """Intruder dimensions per block after each stage, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for stage, record in summary.items():
        blocks = record["per_block"]
        ax.plot(range(len(blocks)), blocks, marker="o", label=f"{stage} ({record['total']})")
    ax.set_xlabel("block")
    ax.set_ylabel("intruder dimensions (block's linears)")
    ax.set_title(title or "intruder dimensions against the base model, after each stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    slimtune.files.write_with(path, lambda partial: fig.savefig(partial, dpi=120))
    plt.close(fig)
