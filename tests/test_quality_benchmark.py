"""A tiny configuration of the quality benchmark runs end to end (the full one is a benchmark, not a
test): data preparation with probe screening, two runs, and every result file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import slimtune

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not slimtune.models.is_available("smollm2-135m"),
    reason=f"needs the built-in model: {slimtune.models.INSTALL}",
)
def test_the_tiny_quality_benchmark_writes_every_result(tmp_path) -> None:
    out, results = tmp_path / "work", tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--preset", "tiny", "--workers", "1"]
    subprocess.run([*command, "--out", str(out), "--results", str(results)], check=True, timeout=900)
    assert {p.name for p in results.iterdir()} == {"runs.csv", "runs.json", "pareto.png", "quality.md"}
    rows = list(csv.DictReader((results / "runs.csv").open()))
    assert [r["method"] for r in rows] == ["full", "paca"]
    for row in rows:
        assert 0.0 <= float(row["probe_retention"]) <= 1.0 and 0.0 <= float(row["target"]) <= 1.0
    meta = json.loads((results / "runs.json").read_text())["meta"]
    assert meta["versions"]["slimtune"] == slimtune.__version__ and meta["preset"] == "tiny"
    assert "Retention at matched target accuracy" in (results / "quality.md").read_text()
    prepared = json.loads((out / "data" / "prepared.json").read_text())
    assert prepared["probes"]["kept_probes"] >= 4  # the base answers the screened probes
