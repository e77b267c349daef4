"""What a finished run reports: metrics.json, the plots and the summary table; each branch's final
model as a plain Hugging Face directory on request."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import slimtune
from slimtune.toolbox import graft as localisation
from torch import nn

from . import graft, metrics, step_log
from .recipe import Recipe
from .run_folder import stage_folder
from .tokenizer import Tokenizer

log = logging.getLogger("slimtune.train")


SOFT_PROMPT = "soft_prompt.safetensors"  # beside an exported model with a soft prompt


def export_hf(model: nn.Module, tokenizer: Tokenizer, folder: Path) -> Path:
    """`save_pretrained` of the (plain, merged) model and its tokenizer, written to a temporary folder
    and renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        if slimtune.prompt.attached(model) is not None:  # not part of the HF weights: saved beside them
            slimtune.prompt.save(model, partial / SOFT_PROMPT)
        save = getattr(tokenizer, "save", None)
        if save is not None:
            save(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _graft_summary(names: list[str], records: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """Each grafted stage's last graft, and the pairwise overlap of the stages' regions."""
    grafted = [(j, r["graft"][-1]) for j, r in enumerate(records) if r.get("graft")]
    if not grafted:
        return {}
    folders = {j: stage_folder(root, j, names[j]) / graft.GRAFT_FILE for j, _ in grafted}
    diffs = {j: slimtune.load_delta(path) for j, path in folders.items() if path.exists()}
    overlap = {
        f"{names[a]}|{names[b]}": localisation.diff_overlap(diffs[a], diffs[b])
        for a in diffs
        for b in diffs
        if a < b
    }
    return {"grafts": {names[j]: record for j, record in grafted}, "graft_overlap": overlap}


def _branch_metrics(recipe: Recipe, acc: metrics.Matrix, leaf: int) -> dict[str, Any]:
    """Forgetting metrics along the stages that led to stage `leaf` (all of them in a linear recipe)."""
    rows = recipe.lineage(leaf)
    names = [recipe.stages[j].name for j in rows]
    learned = [next((k for k, name in enumerate(names) if name in t.stages), None) for t in recipe.tasks]
    return metrics.forgetting([acc[j] for j in rows], [t.name for t in recipe.tasks], learned)


def report(
    recipe: Recipe, base: dict[str, Any], records: list[dict[str, Any]], root: Path, tensorboard: bool = False
) -> dict[str, Any]:
    """metrics.json, forgetting.png, losses.png and summary.txt (and the `evaluation` TensorBoard run);
    prints the summary table."""
    tasks, names = [t.name for t in recipe.tasks], [s.name for s in recipe.stages]
    rows = [base, *(r["eval"] for r in records)]
    acc = [[row[t]["accuracy"] for t in tasks] for row in rows]
    loss = [[row[t]["loss"] for t in tasks] for row in rows]
    branches = {names[leaf]: _branch_metrics(recipe, acc[1:], leaf) for leaf in recipe.leaves()}
    data = {
        "tasks": tasks,
        "stages": names,
        "base": {"accuracy": acc[0], "loss": loss[0]},
        "accuracy": acc[1:],
        "loss": loss[1:],
        **branches[names[-1]],
        "branches": branches,
        **({"intruders": metrics.intruder_summary(names, records)} if recipe.intruders else {}),
        **_graft_summary(names, records, root),
        "training": [
            {"stage": r["stage"], "steps": len(r["losses"]), "final_loss": r["losses"][-1]}
            | {k: r[k] for k in ("ms_per_step", "memory_mib")}
            for r in records
        ],
    }
    slimtune.files.write_text(root / "metrics.json", json.dumps(data, indent=1) + "\n")
    labels = ["base", *names]
    title = recipe.description or recipe.file.stem
    metrics.heatmap(labels, tasks, acc, root / "forgetting.png", loss, f"{title}: accuracy after each stage")
    parents = [recipe.parent(j) for j in range(len(names))]
    metrics.loss_curves(names, [r["losses"] for r in records], root / "losses.png", parents, title)
    if recipe.intruders:
        metrics.intruder_plot(data["intruders"], root / "intruders.png", title)
    if tensorboard:
        step_log.write_evaluations(root / step_log.TENSORBOARD / "evaluation", labels, tasks, acc, loss)
    text = metrics.table(labels, tasks, acc, loss, branches)
    slimtune.files.write_text(root / "summary.txt", text + "\n")
    print(text)
    return data
