"""The quality benchmark's ledger: every finished run's complete record, kept with the results.

A run takes a quarter of an hour on two CPU cores; its work folder (checkpoints, logs) is scratch and
can be lost with the machine. The ledger, one JSON file a run in the results folder's `ledger/`, holds
everything the report reads of a run: the trainer's metrics, the measures of what the base knew, and
each new task's held-out scores after the last stage. The search starts from it as from the work
folder, so a benchmark continued on a fresh clone runs again none of the runs its results hold.

A record names what it was made with: the run's recipe and a digest of the prepared data (probes,
drift sets, the seed's task data). It is read only where both are the ones the search would use now;
a record made with another preset, recipe or data is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = 1
DATA_FILES = ("probes", "text", "code", "replies", "replay")  # data/<name>.jsonl, shared by every seed


def data_digest(out: Path, seed: int, also: tuple[str, ...] = ()) -> str:
    """SHA-256 over the prepared data a run of `seed` is trained and measured on (a missing file
    counts as absent): `DATA_FILES`, the seed's files, then `also` (`data/<name>.jsonl` files only some
    patterns read, hashed last so that the digest of the runs that do not read them stays as it was)."""
    from slimtune.files import hash_file

    folder = out / "data"
    paths = [folder / f"{name}.jsonl" for name in DATA_FILES]
    paths += sorted((folder / f"seed{seed}").glob("*.jsonl"))
    paths += [folder / f"{name}.jsonl" for name in also]
    hasher = hashlib.sha256()
    for path in paths:
        hasher.update(f"{path.relative_to(folder)}|".encode())
        if path.exists():
            hash_file(path, hasher)
        else:
            hasher.update(b"absent")
    return hasher.hexdigest()


def entry(run: Any, recipe: dict[str, Any], digest: str) -> dict[str, Any]:
    """A finished run's record."""
    return {
        "format": FORMAT,
        "method": run.method,
        "seed": run.seed,
        "lr": run.lr,
        "recipe": recipe,
        "data": digest,
        "metrics": run.metrics,
        "measures": run.measures,
        "finals": run.finals,
    }


def keep(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` unless it holds it already."""
    from slimtune.files import write_text

    if path.exists() and json.loads(path.read_text()) == record:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, separators=(",", ":")) + "\n")


def read(path: Path, recipe: dict[str, Any], digest: str) -> dict[str, Any]:
    """The record at `path`, checked (`check`) against the recipe and data the search would use now."""
    return check(json.loads(path.read_text()), recipe, digest, path)


def check(record: dict[str, Any], recipe: dict[str, Any], digest: str, where: Path) -> dict[str, Any]:
    """`record` where it was made with `recipe` on data of `digest`. Raises SystemExit naming `where`
    and what differs."""
    differs = [
        what
        for what, made, now in (
            ("format", record.get("format"), FORMAT),
            ("recipe", record.get("recipe"), recipe),
            ("prepared data", record.get("data"), digest),
        )
        if made != now
    ]
    if differs:
        raise SystemExit(
            f"{where}: not made with this benchmark's {' and '.join(differs)} (another preset, recipe "
            "or data), so it cannot be compared with runs made now. Move it out of the results or work "
            "folder (or run the benchmark as it was made)."
        )
    return record
