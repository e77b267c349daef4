"""Fingerprints of every shipped recipe run on the tiny model (the shrunk runs of
tests/test_train_runs.py): a short hash of metrics.json (timings left out) and of the final weights.
Refactors of the trainer or the toolbox must leave them unchanged: run this before and after (e.g.
with the change stashed) and compare the two lines.

    python benchmarks/recipe_fingerprints.py   (CPU, about a minute)
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train_runs import _shrunk  # noqa: E402


def fingerprints() -> dict[str, str]:
    from slimtune.apps.train import run

    found = {}
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        folder = Path(tempfile.mkdtemp())
        (folder / "recipe.yaml").write_text(yaml.safe_dump(_shrunk(recipe), sort_keys=False))
        result = run(folder / "recipe.yaml", folder / "run")
        metrics = json.loads((folder / "run" / "metrics.json").read_text())
        for stage in metrics.get("training", []):
            stage.pop("ms_per_step", None)
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in result.model.parameters())
        found[recipe.stem] = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()[:16]
        found[f"{recipe.stem} weights"] = hashlib.sha256(weights).hexdigest()[:16]
    return found


if __name__ == "__main__":
    print(json.dumps(fingerprints(), sort_keys=True))
