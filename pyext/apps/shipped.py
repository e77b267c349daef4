"""The recipes installed with the package (`slimtune/recipes/*.yaml`), read from the folder so that
every one is listed; imported by the CLI's help, which must stay quick."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))
