"""Which method fits one 80 GiB card on a 4-bit base: `slimtune profile --quant nf4` of Llama-3.1-8B
and -70B (hand-written configs in benchmarks/configs) at batch 1 x 4096 and 8 x 2048, with and without
gradient checkpointing, accounted on the meta device; then one summary table of the peaks on a card.

    python benchmarks/accounting_4bit.py            # every profile (about 10 min on 2 CPU cores)
    python benchmarks/accounting_4bit.py --reuse    # only the summary, from reports already written
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).parent / "configs"
SHAPES = [("70b", 1, 4096), ("70b", 8, 2048), ("8b", 1, 4096), ("8b", 8, 2048)]
METHODS = "floor,paca,lora,hydra,paca+lean,lora+lean,hydra+lean,peft-lora"
CARD_GIB = 80.0


def folder(size: str, batch: int, seq: int) -> Path:
    return RESULTS / f"accounting-llama-3.1-{size}-nf4-{batch}x{seq}"


def run(size: str, batch: int, seq: int) -> None:
    command = [
        sys.executable, "-m", "slimtune", "profile", "--model", str(CONFIGS / f"llama-3.1-{size}.json"),
        "--batch", str(batch), "--seq", str(seq), "--quant", "nf4", "--methods", METHODS,
        "--checkpointing", "off,non-reentrant", "--card", "h100", "--out", str(folder(size, batch, seq)),
    ]  # fmt: skip
    subprocess.run(command, check=True)


def summary() -> str:
    reports = {shape: json.loads((folder(*shape) / "report.json").read_text()) for shape in SHAPES}
    first = reports[SHAPES[0]]
    labels = [row["label"] for row in first["rows"]]
    header = " | ".join(f"{size.upper()} {batch}x{seq}" for size, batch, seq in SHAPES)
    lines = [f"| row | {header} |", "|---|" + "---|" * len(SHAPES)]
    for label in labels:
        cells = []
        for shape in SHAPES:
            row = next(r for r in reports[shape]["rows"] if r["label"] == label)
            cells.append(f"{row['peak_card']:.1f}" + (" **fits**" if row["peak_card"] <= CARD_GIB else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    return "\n".join(
        [
            "# Llama-3.1 on a 4-bit base: which method fits one 80 GiB card",
            "",
            f"- date: {first['date']}; accounted on the meta device (no GPU), {versions}",
            "- command: `python benchmarks/accounting_4bit.py` (each folder's profile.md gives its own "
            "`slimtune profile` command)",
            "- base: every linear but the LM head bitsandbytes NF4 with double quantization, bf16 otherwise; "
            "PaCA r=64 (QPaCA), LoRA r=16 (QLoRA), Hydra r=8 parallel + 8 sequential (QHydra), PEFT LoRA "
            "r=16; AdamW",
            f"- GiB on a card: the exact accounted peak + {first['allocator_overhead_gib']} GiB allocator "
            "overhead (calibrated on the H200 anchors' TinyLlama step; other shapes may differ). A model "
            f"fits when that is at most {CARD_GIB:g} GiB.",
            "",
            *lines,
            "",
            "Not measured on a GPU. On the CPU the same accounting equals the allocator's measured peak to "
            "the byte without checkpointing (tests/test_profile_quant.py); with checkpointing the CPU "
            "measures host-side extras (RNG states, scalars) that a card does not hold.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="only collate the reports already written")
    args = parser.parse_args()
    if not args.reuse:
        for shape in SHAPES:
            run(*shape)
    text = summary()
    (RESULTS / "accounting-llama-3.1-4bit.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
