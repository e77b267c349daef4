"""benchmarks/gpu_check.sh in its CPU dry run: every phase runs in its time box, saves its files
to $OUT as it ends, and a spent budget skips the remaining phases instead of losing the run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["versions", "build", "step-benchmark", "profile", "backend-choice", "prefer", "gpu-tests-count",
          "gpu-tests", "kernel-microbenchmarks"]  # fmt: skip


def dry_run(tmp_path: Path, budget: int) -> tuple[subprocess.CompletedProcess, Path]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "DRY_RESULTS": str(tmp_path / "res"),
            "BUDGET": str(budget)}  # fmt: skip
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (folder,) = (tmp_path / "out").iterdir()
    return run, folder


def phases(folder: Path) -> dict[str, dict[str, str]]:
    return {row["phase"]: row for row in csv.DictReader((folder / "phases.tsv").open(), delimiter="\t")}


def test_dry_run_runs_every_phase_and_saves_as_it_goes(tmp_path: Path) -> None:
    run, folder = dry_run(tmp_path, budget=480)
    assert run.returncode == 0, run.stdout[-3000:]
    done = phases(folder)
    assert list(done) == PHASES
    assert all(row["rc"] == "0" for row in done.values()), done
    assert (folder / "DRY_RUN").exists()
    assert list(folder.glob("bench-tiny-*.md")) and list(folder.glob("bench-tiny-*.json"))
    assert (folder / "profile" / "profile.csv").exists()
    prefer = (folder / "prefer.md").read_text()
    assert "| lora_linear |" in prefer and "| column_grad |" in prefer
    assert "were not run in this budget" in run.stdout


def test_a_spent_budget_skips_the_rest_and_keeps_what_finished(tmp_path: Path) -> None:
    run, folder = dry_run(tmp_path, budget=22)  # versions and build fit; the 10 s floor skips later ones
    assert run.returncode == 0, run.stdout[-3000:]
    done = phases(folder)
    assert list(done) == PHASES
    assert done["versions"]["rc"] == "0"
    assert "skipped" in {row["rc"] for row in done.values()}
    assert "budget is spent" in run.stdout
    assert (folder / "versions.log").exists()
