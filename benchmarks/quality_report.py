"""The quality benchmark's results: per run, per method and seed at each matched level of learning,
per method over seeds with paired intervals against full fine-tuning; CSV, JSON, Markdown, figures.

Every number at a level is interpolated between the two runs of a method and seed that bracket the
level (`quality_search.crossing`); a method and seed whose search did not bracket a level has no
value there, and the tables say how many seeds each mean holds.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality_search import Point, crossing, interpolate
from quality_stats import Interval, holm, mean_se, paired_interval

REFERENCE = "full"
MIN_SEEDS = 3  # paired seeds a claim needs
DRIFT_NOTE = (
    "Drifts: the change of the mean per-token NLL from the base's, in nats (+: less likely now). The "
    "probes' answer NLL scores the bare answers, which the base does not give (it answers in sentences): "
    "a model taught short replies lowers it without knowing more, so read it beside the word matches."
)
DRIFTS = ("probes", "text", "code", "replies")  # NLL of the probes' answers, prose, code, the base's replies


def own_accuracy(metrics: dict[str, Any], task: str) -> float:
    """A new task's held-out accuracy right after the stage that teaches it (named after the task)."""
    return metrics["accuracy"][metrics["stages"].index(task)][metrics["tasks"].index(task)]


def learned(metrics: dict[str, Any]) -> float:
    """The mean held-out accuracy of the new tasks, each right after the stage that teaches it."""
    return sum(own_accuracy(metrics, t) for t in metrics["tasks"]) / len(metrics["tasks"])


def retention(run) -> float:
    return sum(run.measures["probes"]) / len(run.measures["probes"])


@dataclass
class Matched:
    """One method and seed at one level: the values interpolated between the bracketing runs."""

    method: str
    seed: int
    level: float
    lr: float
    low_lr: float
    high_lr: float
    probes: list[float]  # each probe's score (base-answered probes only), interpolated
    finals: dict[str, list[float]]  # each new task's held-out scores after the last stage
    own: dict[str, float]  # each new task's accuracy after its own stage
    drift: dict[str, float]  # per-token NLL change from the base
    # each probe's 4-way choice (`quality_choice`; probes the base chose right), interpolated; None
    # where a bracketing run predates the measure
    chosen: list[float] | None = None

    @property
    def retention(self) -> float:
        return sum(self.probes) / len(self.probes)


def match(runs: list, level: float, base: dict[str, Any]) -> Matched | None:
    """The chain's values at `level` (runs of one method and seed), or None where not bracketed."""
    by_lr = {r.lr: r for r in runs}
    found = crossing([Point(r.lr, r.learned) for r in runs], level)
    if found is None:
        return None
    low, high, w = by_lr[found.low.lr], by_lr[found.high.lr], found.weight
    answered = [i for i, x in enumerate(base["probes"]) if x]
    tasks = low.metrics["tasks"]

    return Matched(
        low.method,
        low.seed,
        level,
        found.lr,
        low.lr,
        high.lr,
        [interpolate(low.measures["probes"][i], high.measures["probes"][i], w) for i in answered],
        {
            t: [interpolate(a, b, w) for a, b in zip(low.finals[t], high.finals[t], strict=True)]
            for t in tasks
        },
        {t: interpolate(own_accuracy(low.metrics, t), own_accuracy(high.metrics, t), w) for t in tasks},
        {
            d: interpolate(low.measures[f"{d}_nll"], high.measures[f"{d}_nll"], w) - base[f"{d}_nll"]
            for d in DRIFTS
            if all(
                f"{d}_nll" in where for where in (low.measures, high.measures, base)
            )  # older runs lack one
        },
        _chosen_between(low, high, w, base),
    )


def _chosen_between(low, high, weight: float, base: dict[str, Any]) -> list[float] | None:
    """The 4-way choices of the probes the base chose right, interpolated; None where a run or the
    base lacks the measure (it was added after the first runs)."""
    if not all("probes_chosen" in where for where in (low.measures, high.measures, base)):
        return None
    right = [i for i, x in enumerate(base["probes_chosen"]) if x]
    return [
        interpolate(low.measures["probes_chosen"][i], high.measures["probes_chosen"][i], weight)
        for i in right
    ]


def matched_all(runs: list, levels: tuple[float, ...], base: dict[str, Any]) -> list[Matched]:
    chains: dict[tuple[str, int], list] = {}
    for run in runs:
        chains.setdefault((run.method, run.seed), []).append(run)
    found = [match(chain, level, base) for chain in chains.values() for level in levels]
    return [m for m in found if m is not None]


def compare(
    rows: list[Matched], method: str, level: float, score, against: str = REFERENCE
) -> Interval | None:
    """`score(row)` (per-item lists) of `method` minus `against`'s, paired on the seeds where both
    bracketed `level`."""
    seeds = _paired_seeds(rows, method, level, score, against)
    if method == against or not seeds:
        return None
    mine, ref = (
        {m.seed: score(m) for m in rows if m.method == who and m.level == level} for who in (method, against)
    )
    shared = score in (_probes, _chosen)  # the same probes in every seed
    return paired_interval([mine[s] for s in seeds], [ref[s] for s in seeds], shared)


def paired(rows: list[Matched], method: str, against: str, level: float, first_task: str) -> dict[str, Any]:
    """`method` against `against` at `level`: paired intervals for the probes kept in words, their
    4-way choice and the first task at the end, with the seeds each pairs on."""
    return {
        "against": against,
        "paired_seeds": len(_paired_seeds(rows, method, level, _probes, against)),
        "retention_vs": compare(rows, method, level, _probes, against),
        "chosen_vs": compare(rows, method, level, _chosen, against),
        "chosen_seeds": len(_paired_seeds(rows, method, level, _chosen, against)),
        "first_final_vs": compare(rows, method, level, lambda m: m.finals[first_task], against),
    }


# the intervals every summary or pair row holds, each with the count of seeds it pairs on
COMPARISONS = (
    ("retention_vs", "paired_seeds"),
    ("chosen_vs", "chosen_seeds"),
    ("first_final_vs", "paired_seeds"),
)


def adds_to(method: str) -> str | None:
    """The method a combination adds to (`paca` for `paca+lines`); None for a method of its own and for
    the toolbox after full fine-tuning (`full+lines`: compared with full fine-tuning already)."""
    own, plus, _ = method.partition("+")
    return own if plus and own != REFERENCE else None


def _probes(m: Matched) -> list[float]:
    return m.probes


def _chosen(m: Matched) -> list[float] | None:
    return m.chosen


def _paired_seeds(
    rows: list[Matched], method: str, level: float, score, against: str = REFERENCE
) -> list[int]:
    """Seeds where `method` and `against` both have `score` at `level`."""
    have = [{m.seed for m in rows if m.method == who and m.level == level and score(m) is not None}
            for who in (method, against)]  # fmt: skip
    return sorted(have[0] & have[1])


def summary(rows: list[Matched], methods: list[str], level: float, first_task: str) -> list[dict[str, Any]]:
    """Per method at `level`: means and standard errors over its bracketed seeds; paired intervals
    against full fine-tuning for probe retention and for the first task's final accuracy."""
    out = []
    for method in methods:
        mine = [m for m in rows if m.method == method and m.level == level]
        if not mine:
            out.append({"method": method, "level": level, "seeds": 0, "against": REFERENCE})
            continue
        out.append(
            {
                "method": method,
                "level": level,
                "seeds": len(mine),
                "lr": _geomean([m.lr for m in mine]),
                "retention": mean_se([m.retention for m in mine]),
                "chosen": _share([m.chosen for m in mine if m.chosen is not None]),
                "first_final": mean_se([_mean(m.finals[first_task]) for m in mine]),
                **paired(rows, method, REFERENCE, level, first_task),
                **{f"{d}_drift": _drift(mine, d) for d in DRIFTS},
            }
        )
    return out


def _rounded_share(values: list[float] | None) -> float | str:
    return "" if values is None else round(_mean(values), 4)


def _share(lists: list[list[float]]):
    """Mean ± SE over seeds of each list's mean; None without any."""
    return mean_se([_mean(x) for x in lists]) if lists else None


def _drift(rows: list[Matched], name: str):
    values = [m.drift[name] for m in rows if name in m.drift]
    return mean_se(values) if values else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _geomean(values: list[float]) -> float:
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values))


def _est(e) -> str:
    return "-" if e is None else f"{e.mean:.3f}" + ("" if e.se is None else f" ± {e.se:.3f}")


def _ci(i: Interval | None, claim: bool = True, signed: str = "+.3f") -> str:
    if i is None:
        return "-"
    mark = " **" if claim and i.excludes_zero else ""
    return f"{i.difference:{signed}} [{i.low:{signed}}, {i.high:{signed}}]{_over_seeds(i, signed)}{mark}"


def _p(i: Interval) -> str:
    return "" if i.seed_p is None else f", p {i.seed_p:.3f}"


def _over_seeds(i: Interval, signed: str = "+.3f") -> str:
    """The t interval over the seeds' differences, where there are two seeds or more."""
    return "" if i.seed_low is None else f"; seeds (t) [{i.seed_low:{signed}}, {i.seed_high:{signed}}]"


def summary_table(summ: list[dict[str, Any]], first_task: str) -> list[str]:
    lines = [
        f"| method | seeds | lr (geo. mean) | probes kept | vs full [95% CI] | probes chosen (4-way) "
        f"| vs full [95% CI] | {first_task} at the end "
        "| vs full [95% CI] | probe answer NLL drift | prose NLL drift | code NLL drift | reply NLL drift |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summ:
        if not s["seeds"]:
            lines.append(f"| {s['method']} | 0 (not bracketed) | | | | | | | | | | | |")
            continue
        drifts = " | ".join(_est(s[f"{d}_drift"]) for d in DRIFTS)
        kept, chosen, first = _cells(s)
        lines.append(
            f"| {s['method']} | {s['seeds']} | {s['lr']:.2g} | {_est(s['retention'])} | {kept} "
            f"| {_est(s['chosen'])} | {chosen} | {_est(s['first_final'])} | {first} | {drifts} |"
        )
    return lines


def category_table(rows: list[Matched], methods: list[str], level: float, categories: list[str]) -> list[str]:
    names = sorted(set(categories))
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method in methods:
        mine = [m for m in rows if m.method == method and m.level == level]
        if not mine:
            continue
        cells = []
        for name in names:
            picked = [i for i, c in enumerate(categories) if c == name]
            cells.append(_est(mean_se([_mean([m.probes[i] for i in picked]) for m in mine])))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def task_table(rows: list[Matched], methods: list[str], level: float, tasks: list[str]) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"{t} after its stage | {t} at the end" for t in tasks) + " |",
        "|---" * (2 * len(tasks) + 1) + "|",
    ]
    for method in methods:
        mine = [m for m in rows if m.method == method and m.level == level]
        if mine:
            cells = [
                _est(mean_se([m.own[t] for m in mine]))
                + " | "
                + _est(mean_se([_mean(m.finals[t]) for m in mine]))
                for t in tasks
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def claims(summ: list[dict[str, Any]], first_task: str) -> list[str]:
    """Sentences for the differences whose paired interval excludes 0, and for those that do not;
    none from fewer than `MIN_SEEDS` paired seeds (with one seed the interval knows nothing of how
    another draw of data and training would differ). Rows are `summary`'s or `pairs`'."""
    out = []
    for s in summ:
        against = "full fine-tuning" if s["against"] == REFERENCE else s["against"]
        whats = ("general-knowledge probes", "the probes' 4-way choice", first_task)
        for (key, seeds), what in zip(COMPARISONS, whats, strict=True):
            i = s.get(key)
            if i is None:
                continue
            head = f"- at {s['level']:.0%} learned, {s['method']} vs {against} on {what}"
            if s[seeds] < MIN_SEEDS:
                out.append(f"{head}: not claimed ({s[seeds]} paired seeds; a claim needs {MIN_SEEDS})")
                continue
            verdict = (
                ("keeps more" if i.difference > 0 else "keeps less")
                if i.excludes_zero
                else "no difference resolved"
            )
            out.append(
                f"{head}: {verdict} ({i.difference:+.3f}, 95% CI [{i.low:+.3f}, {i.high:+.3f}]"
                f"{_over_seeds(i)}{_p(i)}, {s[seeds]} paired seeds)"
            )
    return out


def pairs(
    rows: list[Matched], asked: list[tuple[str, str]], level: float, first_task: str
) -> list[dict[str, Any]]:
    """The comparisons beside those against full fine-tuning (`--pairs A:B`, `quality.own_pairs`): A minus B,
    paired on the seeds where both bracketed `level`."""
    return [{"method": a, "level": level, **paired(rows, a, b, level, first_task)} for a, b in asked]


def pairs_table(found: list[dict[str, Any]], first_task: str) -> list[str]:
    lines = [
        f"| A vs B | paired seeds | probes kept, A - B [95% CI] | probes chosen (4-way), A - B "
        f"| {first_task} at the end, A - B |",
        "|---|---|---|---|---|",
    ]
    for s in found:
        lines.append(f"| {s['method']} vs {s['against']} | {s['paired_seeds']} | {' | '.join(_cells(s))} |")
    return lines


def _cells(s: dict[str, Any]) -> list[str]:
    """The row's intervals (`COMPARISONS`), `**` on those that are claims: excluding 0 on enough seeds."""
    return [_ci(s[key], s[seeds] >= MIN_SEEDS) for key, seeds in COMPARISONS]


def run_rows(runs: list) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        tasks = r.metrics["tasks"]
        rows.append(
            {
                "method": r.method,
                "seed": r.seed,
                "lr": r.lr,
                "learned": round(r.learned, 4),
                **{f"{t}_own": own_accuracy(r.metrics, t) for t in tasks},
                **{f"{t}_final": r.metrics["accuracy"][-1][tasks.index(t)] for t in tasks},
                "probes_kept": round(retention(r), 4),
                "probes_chosen": _rounded_share(r.measures.get("probes_chosen")),  # all probes, 4-way
                **{f"{d}_nll": round(r.measures[f"{d}_nll"], 4) for d in DRIFTS if f"{d}_nll" in r.measures},
                "wall_s": round(r.measures.get("wall_s", 0.0)),
            }
        )
    return rows


def versions() -> dict[str, str]:
    import peft
    import slimtune
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "slimtune": slimtune.__version__,
    }


def write(
    results: Path, runs: list, info: dict[str, Any], setup: dict[str, Any], command: str, wall: float
) -> None:
    """runs.csv, matched.csv, results.json, quality.md and the figures."""
    import quality_figures as figures

    results.mkdir(parents=True, exist_ok=True)
    base, levels, methods = info["base"], tuple(setup["levels"]), list(setup["methods"])
    rows = matched_all(runs, levels, base)
    first = runs[0].metrics["tasks"][0]
    tasks = runs[0].metrics["tasks"]
    _csv(results / "runs.csv", run_rows(runs))
    _csv(results / "matched.csv", [_flat(m) for m in rows])
    summaries = {level: summary(rows, methods, level, first) for level in levels}
    asked = [tuple(pair) for pair in setup.get("pairs", ())]
    compared = {level: pairs(rows, asked, level, first) for level in levels}
    categories = [c for c, x in zip(info["categories"], base["probes"], strict=True) if x]
    meta = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "wall_time_s": round(wall),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "versions": versions(),
        "setup": setup,
        "probes": info["probes"],
        "runs": len(runs),
    }
    (results / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": {str(k): v for k, v in summaries.items()},
                "pairs": {str(k): v for k, v in compared.items()},
            },
            indent=1,
            default=_plain,
        )
        + "\n"
    )
    figures.tradeoff(runs, rows, methods, levels, base, results / "tradeoff.png")
    figures.forgetting(rows, methods, _widest(levels, rows), tasks, results / "forgetting.png")
    lines = _markdown(meta, summaries, compared, rows, methods, categories, tasks, first)
    (results / "quality.md").write_text("\n".join(lines) + "\n")


def _markdown(meta, summaries, compared, rows, methods, categories, tasks, first) -> list[str]:
    setup = meta["setup"]
    found = [s for group in (*summaries.values(), *compared.values()) for s in group]
    lines = [
        f"# Quality benchmark: SmolLM2-135M-Instruct, preset `{setup['preset']}`",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; wall time {meta['wall_time_s'] / 60:.0f} min  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        f"Tasks in sequence: {', '.join(tasks)}; {setup['steps']} steps per stage, "
        f"batch {setup['batch_size']} x "
        f"{setup['seq_len']} tokens; seeds {setup['seeds']} (each draws its own task data); "
        f"{meta['probes']['kept']} of {meta['probes']['candidates']} probes answered by the base; "
        f"{meta['runs']} runs.",
        "",
        "![trade-off](tradeoff.png)",
        "",
        "![forgetting](forgetting.png)",
        "",
        "## What the intervals support",
        "",
        "A difference is claimed only where two paired 95% intervals exclude 0: the bootstrap over "
        "seeds and items, and the t interval over the seeds' differences (`seeds (t)`; with 3 seeds "
        "the bootstrap alone excludes 0 whenever the seeds agree in sign). `**` marks a claim.",
        "",
        _multiplicity(found),
        "",
        "The claims, smallest p first:",
        "",
        *claims_table(found, first),
        "",
        "Every comparison:",
        "",
        *claims([s for summ in summaries.values() for s in summ], first),
        "",
        *_pair_claims(compared, first),
    ]
    for level, summ in summaries.items():
        lines += [
            f"## At {level:.0%} learned",
            "",
            *summary_table(summ, first),
            "",
            DRIFT_NOTE,
            "",
            *task_table(rows, methods, level, tasks),
            "",
            *(
                [
                    f"Pairs (`--pairs`, and each combination against its method) at {level:.0%} learned:",
                    "",
                    *pairs_table(compared[level], first),
                    "",
                ]
                if compared[level]
                else []
            ),
        ]
    top = _widest(tuple(summaries), rows)
    lines += [
        f"## Probes kept by category at {top:.0%} learned",
        "",
        *category_table(rows, methods, top, categories),
        "",
    ]
    lines += [
        "## Brackets (per method, seed and level: the two runs the values are interpolated between)",
        "",
        "| method | seed | level | lr | bracket |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {m.method} | {m.seed} | {m.level:.0%} | {m.lr:.3g} | [{m.low_lr:.3g}, {m.high_lr:.3g}] |"
        for m in rows
    ]
    return [*lines, "", "Every run: `runs.csv`; the interpolated values: `matched.csv`."]


def _readable(found: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The comparisons with the seeds for a claim, as (summary or pair row, interval key)."""
    return [
        (s, key)
        for s in found
        for key, seeds in COMPARISONS
        if s.get(key) is not None and s[seeds] >= MIN_SEEDS
    ]


def _multiplicity(found: list[dict[str, Any]]) -> str:
    """How many comparisons could be claims, and how many of those chance alone would make."""
    n = len(_readable(found))
    return (
        f"{n} comparisons below have the seeds for a claim. Where nothing differs, about {0.05 * n:.1f} of "
        "them would exclude 0 by chance at 95%; each gives its p (the seeds' t test). The `**` marks make "
        "no correction for their number; the table of claims says which survive Holm's."
    )


def claims_table(found: list[dict[str, Any]], first_task: str) -> list[str]:
    """The claims, smallest p first, each marked where it survives Holm's correction for every
    comparison with the seeds for a claim (family-wise 5%): the few a reader can take as established."""
    readable = _readable(found)
    survives = holm([1.0 if s[key].seed_p is None else s[key].seed_p for s, key in readable])
    held = [(s, key, kept) for (s, key), kept in zip(readable, survives, strict=True) if s[key].excludes_zero]
    held.sort(key=lambda c: c[0][c[1]].seed_p)
    return [
        f"| level | A vs B | on | A - B | 95% CI | seeds (t) | p | seeds | Holm (of {len(readable)}) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_claim_row(s, key, kept, first_task) for s, key, kept in held),
    ]


def _claim_row(s: dict[str, Any], key: str, kept: bool, first_task: str) -> str:
    i, seeds = s[key], dict(COMPARISONS)[key]
    against = "full" if s["against"] == REFERENCE else s["against"]
    on = {"retention_vs": "probes in words", "chosen_vs": "probes, 4-way choice"}
    cells = (
        f"{s['level']:.0%}",
        f"{s['method']} vs {against}",
        on.get(key, f"{first_task} at the end"),
        f"{i.difference:+.3f}",
        f"[{i.low:+.3f}, {i.high:+.3f}]",
        f"[{i.seed_low:+.3f}, {i.seed_high:+.3f}]",
        f"{i.seed_p:.2g}",
        str(s[seeds]),
        "survives" if kept else "-",
    )
    return "| " + " | ".join(cells) + " |"


def _pair_claims(compared: dict[float, list[dict[str, Any]]], first: str) -> list[str]:
    found = [s for level in compared.values() for s in level]
    if not found:
        return []
    return [
        "Pairs (`--pairs`, and each combination against its method; the same paired interval, A minus B, "
        "on the seeds both have):",
        "",
        *claims(found, first),
        "",
    ]


def _widest(levels: tuple[float, ...], rows: list[Matched]) -> float:
    """The level most methods and seeds reached (the higher one on a tie): the one whose means hold the
    most seeds."""
    return max(levels, key=lambda level: (sum(m.level == level for m in rows), level))


def _flat(m: Matched) -> dict[str, Any]:
    return {
        "method": m.method,
        "seed": m.seed,
        "level": m.level,
        "lr": round(m.lr, 8),
        "low_lr": m.low_lr,
        "high_lr": m.high_lr,
        "probes_kept": round(m.retention, 4),
        "probes_chosen_kept": _rounded_share(m.chosen),  # of those the base chose right
        **{f"{t}_own": round(v, 4) for t, v in m.own.items()},
        **{f"{t}_final": round(_mean(v), 4) for t, v in m.finals.items()},
        **{f"{d}_drift": round(v, 4) for d, v in m.drift.items()},
    }


def _plain(value: Any) -> Any:
    return value.__dict__ if hasattr(value, "__dict__") else str(value)


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Every column any row has (runs from before a measure was added lack it: an empty cell)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["none"])
        writer.writeheader()
        writer.writerows(rows)
