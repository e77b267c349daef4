"""The quality benchmark's figures: learning versus keeping (core methods, the toolbox after full
fine-tuning and the combinations in separate panels, labelled directly), and each new task's accuracy at
the end (what the later stages took)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality_report import REFERENCE, Matched, adds_to, retention
from quality_stats import mean_se

CORE = ("full", "lora", "paca", "s2ft", "hft")
LEFT = 0.3  # runs that learned less are drawn at the left edge (◁)
CAPTION = (
    "Small dots: single runs (one seed, one learning rate); ◁ at the left edge: runs that learned less than "
    f"{LEFT} (the rate broke the model). Large markers: mean over seeds at the matched levels of learning "
    "({levels}), interpolated between each seed's two bracketing runs, the methods set slightly apart; "
    "bars: ± 1 standard error; a hollow marker stands for fewer seeds than the method has (the others never "
    "bracketed that level); after each name, its seeds at each level. Top: probes answered in words "
    "(whole-word match). Bottom: probes whose answer is still the likeliest of four of its category in the "
    "base's reply (4-way choice, of those the base chose right; runs from before that measure are left out)."
)


TITLE = "SmolLM2-135M-Instruct: learning three new tasks in sequence\nversus keeping what the base knew"


@dataclass(frozen=True)
class Measure:
    """One row of panels: a run's value (None: not measured) and a matched row's."""

    label: str
    of_run: Callable[[Any], float | None]
    of_row: Callable[[Matched], float | None]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _points(rows: list[Matched], method: str, levels, measure: Measure) -> list[tuple[float, Any, int]]:
    """Per level the method's mean over seeds (with its standard error) and how many seeds."""
    out = []
    for level in levels:
        values = [measure.of_row(m) for m in rows if m.method == method and m.level == level]
        values = [v for v in values if v is not None]
        if values:
            out.append((level, mean_se(values), len(values)))
    return out


def _spread(heights: list[float], gap: float) -> list[float]:
    """`heights` (sorted) moved apart to at least `gap` each, as little as possible, within [0, 1]."""
    out: list[float] = []
    for h in heights:
        out.append(max(h, out[-1] + gap) if out else h)
    overflow = out[-1] - 1.0 if out else 0.0
    if overflow > 0:  # shift the top back down, pushing the others down as needed
        out[-1] -= overflow
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - gap)
    return out


def _label_ends(ax, ends: list[tuple[float, float, str, Any]], right: float) -> None:
    """Each method's name in a column right of the last level, moved apart so none overlap, with a thin
    line to its last point."""
    ends = sorted(ends, key=lambda e: e[1])
    for (x, y, method, color), placed in zip(ends, _spread([e[1] for e in ends], 0.05), strict=True):
        line = {"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6}
        ax.annotate(
            method, (x, y), xytext=(right, placed), color=color, fontsize=8, va="center", arrowprops=line
        )


def _panel(ax, runs, rows, methods, levels, colors: dict[str, Any], measure: Measure) -> None:
    ends: list[tuple[float, float, str, Any]] = []
    for i, method in enumerate(methods):
        color = colors[method]
        mine = [(r.learned, measure.of_run(r)) for r in runs if r.method == method]
        mine = [(x, y) for x, y in mine if y is not None]
        inside = [(x, y) for x, y in mine if x >= LEFT]
        ax.scatter([x for x, _ in inside], [y for _, y in inside], color=color, alpha=0.3, s=12)
        edge = [y for x, y in mine if x < LEFT]  # runs that learned almost nothing: at the left edge
        ax.scatter([LEFT + 0.008] * len(edge), edge, color=color, alpha=0.5, s=18, marker="<")
        points = _points(rows, method, levels, measure)
        if not points:
            continue
        shift = (i - (len(methods) - 1) / 2) * 0.006  # methods side by side at each level
        seeds = len({r.seed for r in runs if r.method == method})
        ax.errorbar([x + shift for x, _, _ in points], [e.mean for _, e, _ in points],
                    yerr=[e.se or 0.0 for _, e, _ in points], color=color, capsize=3, lw=1.5)  # fmt: skip
        for x, e, n in points:
            ax.plot([x + shift], [e.mean], "o", color=color, markerfacecolor=color if n >= seeds else "white")
        counts = {level: n for level, _, n in points}
        name = f"{method} ({'/'.join(str(counts.get(level, 0)) for level in levels)})"
        ends.append((points[-1][0] + shift, points[-1][1].mean, name, color))
    _label_ends(ax, ends, right=max(levels) + 0.05)
    ax.set_xlim(LEFT, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_ylabel(measure.label, fontsize=8)


def measures(base: dict[str, Any]) -> list[Measure]:
    """The two rows: probes answered in words, and the 4-way choice (on the probes the base chose)."""
    right = [i for i, x in enumerate(base.get("probes_chosen", [])) if x]

    def chosen(run) -> float | None:
        found = run.measures.get("probes_chosen")
        return sum(found[i] for i in right) / len(right) if found and right else None

    return [
        Measure("probes still answered in words\n(share of the base's)", retention, lambda m: m.retention),
        Measure(
            "probes whose answer is still the likeliest of 4\n(share of the base's)",
            chosen,
            lambda m: None if m.chosen is None else sum(m.chosen) / len(m.chosen),
        ),
    ]


def _colors(groups: list[tuple[str, list[str]]], palette) -> list[dict[str, Any]]:
    """Each panel's colours, strong ones only: the first is full fine-tuning's alone, a method drawn in
    an earlier panel keeps the colour it had there, the others take the colours still free in the panel
    in turn (again from the second when they run out; the names are written beside the lines)."""
    first = {REFERENCE: palette[0]}
    panels = []
    for _, group in groups:
        mine = {m: first[m] for m in group if m in first}
        free = [c for c in palette[1:] if c not in mine.values()] or list(palette[1:])
        mine.update(zip([m for m in group if m not in mine], itertools.cycle(free)))
        panels.append(mine)
        first = {**mine, **first}
    return panels


def groups(methods: list[str]) -> list[tuple[str, list[str]]]:
    """The panels: the core methods; the toolbox after full fine-tuning (and CorDA-KPM's LoRA) beside
    full fine-tuning; each combination beside the method it adds to."""
    combined = [m for m in methods if adds_to(m)]
    toolbox = [m for m in methods if m not in CORE and m not in combined]
    own = {adds_to(m) for m in combined}
    panels = [("core methods", [m for m in methods if m in CORE])]
    if toolbox:
        panels.append(("toolbox", [REFERENCE, *toolbox]))
    if combined:
        panels.append(("combinations", [m for m in methods if m in own] + combined))
    return panels


def tradeoff(runs, rows, methods, levels, base: dict[str, Any], path: Path) -> None:
    plt = _plt()
    methods = [m for m in methods if any(r.method == m for r in runs)]  # a method without runs draws nothing
    panels = groups(methods)
    rows_of = measures(base)
    fig, axes = plt.subplots(len(rows_of), len(panels), figsize=(6.5 * len(panels), 9.5), squeeze=False)
    colors = _colors(panels, plt.get_cmap("tab10").colors)
    for row, measure in zip(axes, rows_of, strict=True):
        for ax, (_, group), panel_colors in zip(row, panels, colors, strict=True):
            _panel(ax, runs, rows, group, levels, panel_colors, measure)
    for ax, (title, _) in zip(axes[0], panels, strict=True):
        ax.set_title(title)
    for ax in axes[-1]:
        ax.set_xlabel("new tasks learned (mean held-out accuracy, each task after its own stage)", fontsize=8)
    fig.suptitle(
        "SmolLM2-135M-Instruct: learning three new tasks in sequence\nversus keeping what the base knew"
    )
    fig.text(0.01, 0.005, CAPTION.format(levels=", ".join(f"{x:g}" for x in levels)), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


FORGETTING_CAPTION = (
    "Per method, the mean over the seeds that reach {level:.0%} learned (n under its name), interpolated "
    "between each seed's two bracketing runs. Pale hatched bars: each task's held-out accuracy right after "
    "the stage that teaches it; solid bars: the same task after the last stage; bars on the solid ones: "
    "± 1 standard error over seeds. Methods are compared at the same learning, not the same rate."
)


def forgetting(rows, methods, level, tasks, path: Path) -> None:
    """Grouped bars: each task's accuracy after its own stage (hatched) and at the end (with ± 1 SE over
    seeds), at `level`; each method named with its number of seeds."""
    plt = _plt()
    shown = [m for m in methods if any(r.method == m and r.level == level for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shown) + 2), 5.0))
    width = 0.8 / len(tasks)
    colors = plt.get_cmap("tab10").colors
    names = []
    for j, method in enumerate(shown):
        mine = [r for r in rows if r.method == method and r.level == level]
        names.append(f"{method}\nn={len(mine)}")
        for k, task in enumerate(tasks):
            own = mean_se([r.own[task] for r in mine]).mean
            end = mean_se([sum(r.finals[task]) / len(r.finals[task]) for r in mine])
            x = j + (k - (len(tasks) - 1) / 2) * width
            first = j == 0
            ax.bar(x, own, width, color=colors[k], alpha=0.25, hatch="//",
                   label=f"{task} after its stage" if first else None)  # fmt: skip
            ax.bar(x, end.mean, width * 0.6, color=colors[k], yerr=end.se or 0.0, capsize=2,
                   error_kw={"lw": 0.8}, label=f"{task} at the end" if first else None)  # fmt: skip
    ax.set_xticks(range(len(shown)), names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.set_title(f"What the later stages took, at {level:.0%} learned")
    ax.legend(fontsize=7, ncol=len(tasks), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.text(0.01, 0.01, FORGETTING_CAPTION.format(level=level), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
