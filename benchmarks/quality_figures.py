"""The quality benchmark's figures: learning versus keeping (core methods and the toolbox in separate
panels, labelled directly), and each new task's accuracy at the end (what the later stages took)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quality_report import retention
from quality_stats import mean_se

CORE = ("full", "lora", "paca", "s2ft", "hft")
CAPTION = (
    "Small dots: single runs (one seed, one learning rate). Large markers: mean over seeds at the matched "
    "levels of learning ({levels}), interpolated between each seed's two bracketing runs; bars: ± 1 "
    "standard error."
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, runs, rows, methods, levels, colors: dict[str, Any]) -> None:
    for method in methods:
        color = colors[method]
        mine = [r for r in runs if r.method == method]
        ax.scatter([r.learned for r in mine], [retention(r) for r in mine], color=color, alpha=0.3, s=12)
        xs, ys, es = [], [], []
        for level in levels:
            at = [m.retention for m in rows if m.method == method and m.level == level]
            if at:
                estimate = mean_se(at)
                xs.append(level)
                ys.append(estimate.mean)
                es.append(estimate.se or 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, color=color, marker="o", capsize=3, lw=1.5)
            ax.annotate(method, (xs[-1], ys[-1]), xytext=(6, 0), textcoords="offset points", color=color,
                        fontsize=8, va="center")  # fmt: skip
    ax.set_xlim(-0.02, 1.12)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_xlabel("new tasks learned (mean held-out accuracy, each task after its own stage)")


def tradeoff(runs, rows, methods, levels, path: Path) -> None:
    plt = _plt()
    methods = [m for m in methods if any(r.method == m for r in runs)]  # a method without runs draws nothing
    groups = [("core methods", [m for m in methods if m in CORE])]
    extra = [m for m in methods if m not in CORE]
    if extra:  # full fine-tuning drawn again beside the toolbox, as the reference
        groups.append(("toolbox and combinations", [m for m in methods if m == "full"] + extra))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5.2), squeeze=False)
    palette = plt.get_cmap("tab20").colors  # one colour per method in both panels
    colors = {m: palette[(2 * i) % 20 + (2 * i) // 20] for i, m in enumerate(methods)}
    for ax, (title, group) in zip(axes[0], groups, strict=True):
        _panel(ax, runs, rows, group, levels, colors)
        ax.set_title(title)
    axes[0][0].set_ylabel("general-knowledge probes still answered (share of the base's)")
    fig.suptitle(
        "SmolLM2-135M-Instruct: learning three new tasks in sequence versus keeping what the base knew"
    )
    fig.text(0.01, 0.005, CAPTION.format(levels=", ".join(f"{x:g}" for x in levels)), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def forgetting(rows, methods, level, tasks, path: Path) -> None:
    """Grouped bars: each task's accuracy after its own stage (hatched) and at the end, at `level`."""
    plt = _plt()
    shown = [m for m in methods if any(r.method == m and r.level == level for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shown) + 2), 4.5))
    width = 0.8 / len(tasks)
    colors = plt.get_cmap("tab10").colors
    for k, task in enumerate(tasks):
        for j, method in enumerate(shown):
            mine = [r for r in rows if r.method == method and r.level == level]
            own = sum(r.own[task] for r in mine) / len(mine)
            end = sum(sum(r.finals[task]) / len(r.finals[task]) for r in mine) / len(mine)
            x = j + (k - (len(tasks) - 1) / 2) * width
            ax.bar(
                x,
                own,
                width,
                color=colors[k],
                alpha=0.25,
                hatch="//",
                label=f"{task} after its stage" if j == 0 else None,
            )
            ax.bar(x, end, width * 0.6, color=colors[k], label=f"{task} at the end" if j == 0 else None)
    ax.set_xticks(range(len(shown)), shown, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.set_title(f"What the later stages took, at {level:.0%} learned")
    ax.legend(fontsize=7, ncol=len(tasks), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
