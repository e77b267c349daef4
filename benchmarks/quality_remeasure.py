"""Measure again the finished runs of a quality work folder that predate a measure.

    python benchmarks/quality_remeasure.py --preset cpu --out /work/qrun/cpu [RUN ...]

A run that finished before a measure was added to `quality.measure` (the probes' answer NLL, their
4-way choice) lacks it, and the report leaves it out of that column. Nothing trains again: the
trainer's resume restores each stage from its checkpoint, and the final model is measured as a new run
would be, in the parts of `quality.measure` it lacks and the prose NLL as a check: a measure the run
already has must come out the same (runs are deterministic, so this checks that the restored model is
the one measured; a first check re-measured every part of two runs, full fine-tuning and PaCA, and
found them identical); the new measures are added, the old ones kept. The next search or report
writes them into the ledger too (a run in the work folder is read from there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402

NLL_TOLERANCE = 1e-4  # nats: the restored model's NLLs against those measured after training
CHECK = "text_nll"  # the measure taken again to check the restored model (the cheapest)


def missing(folder: Path, out: Path) -> set[str]:
    """The measures the base has (the current `measure`'s) that the run folder's lack."""
    wanted = set(json.loads((out / "data" / "prepared.json").read_text())["base"])
    return wanted - set(json.loads((folder / "measures.json").read_text()))


def lacking(out: Path) -> list[Path]:
    """The finished run folders whose measures lack one."""
    folders = sorted(f for f in (out / "runs").iterdir() if (f / "measures.json").exists())
    return [f for f in folders if missing(f, out)]


def unfinished_stages(folder: Path, out: Path) -> list[str]:
    """The recipe's stages without a result in the run folder: the trainer's resume would train them,
    which a remeasure must never do."""
    import yaml
    from slimtune.apps.train.run_folder import stage_folder

    stages = yaml.safe_load((out / f"{folder.name}.yaml").read_text())["stages"]
    return [
        s["name"]
        for i, s in enumerate(stages)
        if not (stage_folder(folder, i, s["name"]) / "result.json").exists()
    ]


def remeasure(folder: Path, out: Path, preset: quality.Preset) -> dict[str, Any]:
    """The run's final model, restored from its stages, measured where it lacks a measure (and on
    CHECK); its measures with the new ones added. Raises RuntimeError, its measures.json left as it
    was, where a stage has no result (before the trainer is called) or a measure it had comes out
    different (the trainer's resume has by then appended to its log and rewritten its report)."""
    import slimtune
    from slimtune.apps.train import run

    old = json.loads((folder / "measures.json").read_text())
    unfinished = unfinished_stages(folder, out)
    if unfinished:
        raise RuntimeError(
            f"{folder}: stages {', '.join(unfinished)} have no result, so no checkpoint to restore"
        )
    keys = missing(folder, out) | {CHECK}
    result = run(out / f"{folder.name}.yaml", folder, resume=True)
    with slimtune.prompt.using(result.model, None):
        new = quality.measure(result.model, out, preset, keys)
    changed = differences(old, new)
    if changed:
        raise RuntimeError(f"{folder}: the restored model measures differently ({'; '.join(changed)})")
    merged = {**new, **old}
    slimtune.files.write_text(folder / "measures.json", json.dumps(merged))  # atomic: old or new, never half
    return merged


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The measures both have that disagree: per-probe scores exactly, NLLs to NLL_TOLERANCE."""
    out = []
    for key in sorted(set(old) & set(new)):
        if isinstance(old[key], list):
            flips = sum(a != b for a, b in zip(old[key], new[key], strict=True))
            if flips:
                out.append(f"{key}: {flips} of {len(old[key])} items")
        elif abs(old[key] - new[key]) > NLL_TOLERANCE:
            out.append(f"{key}: {old[key]:.6f} then {new[key]:.6f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(quality.PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="the work folder the runs are in")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a search may run beside it)")
    parser.add_argument("runs", nargs="*", help="run folders, in this order (default: all lacking one)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    folders = lacking(args.out)
    if args.runs:
        unknown = sorted(set(args.runs) - {f.name for f in folders})
        if unknown:
            parser.error(f"{', '.join(unknown)}: no finished run of that name lacks a measure in {args.out}")
        folders = [args.out / "runs" / name for name in args.runs]
    print(f"quality: {len(folders)} runs lack a measure", flush=True)
    refused = []
    for i, folder in enumerate(folders, 1):
        try:
            merged = remeasure(folder, args.out, quality.PRESETS[args.preset])
        except (RuntimeError, FileNotFoundError) as err:  # one run that cannot be restored stops no other
            refused.append(folder.name)
            print(f"quality: {i}/{len(folders)} {folder.name}: not measured: {err}", flush=True)
            continue
        print(f"quality: {i}/{len(folders)} {folder.name}: now {sorted(merged)}", flush=True)
    return 1 if refused else 0


if __name__ == "__main__":
    raise SystemExit(main())
