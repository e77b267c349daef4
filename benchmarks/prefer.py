"""Which backend each op should prefer on the card a kernel benchmark ran on.

Reads pytest-benchmark JSONs of `bench_kernels.py` / `bench_lora.py` (one per op, or one; groups named
`<op> <shape>`, one benchmark per backend, `extra_info.label` = backend), sums each backend's
median over the shapes where every backend of that op ran, and prints the fastest against the
op's current CUDA default.

    python benchmarks/prefer.py KERNELS.json [MORE.json ...] [--out prefer.md]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from slimtune import ops


def preferences(data: dict) -> list[dict]:
    by_op: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for bench in data.get("benchmarks", []):
        op, _, shape = bench["group"].partition(" ")
        backend = bench.get("extra_info", {}).get("label")
        if op in ops.OPS and backend in ops.OPS[op].impls and bench.get("stats"):
            by_op[op][shape][backend] = bench["stats"]["median"]
    rows = []
    for op, shapes in sorted(by_op.items()):
        backends = set.intersection(*(set(b) for b in shapes.values()))
        if not backends:
            continue
        totals = {b: sum(shapes[s][b] for s in shapes) for b in sorted(backends)}
        best = min(totals, key=totals.get)
        default = (ops.OPS[op].prefer_cuda or ("torch",))[0]
        rows.append({
            "op": op,
            "shapes": len(shapes),
            "us": {b: round(t * 1e6, 1) for b, t in totals.items()},
            "fastest": best,
            "default": default,
            "speedup_over_default": round(totals.get(default, float("nan")) / totals[best], 3),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict], source: str) -> str:
    lines = [
        f"Backend preference from `{source}` (sum of medians over the TinyLlama shapes)",
        "",
        "| op | shapes | us per backend | fastest | CUDA default | default / fastest |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        us = ", ".join(f"{b} {t}" for b, t in r["us"].items())
        verdict = "keep" if r["fastest"] == r["default"] else f"prefer {r['fastest']}"
        lines.append(
            f"| {r['op']} | {r['shapes']} | {us} | {r['fastest']} | {r['default']} "
            f"| {r['speedup_over_default']} ({verdict}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSONs of the kernel benchmarks")
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args()
    found = [Path(p) for p in args.json if Path(p).is_file()]  # an op cut off by its time box wrote none
    benchmarks = [b for p in found for b in json.loads(p.read_text()).get("benchmarks", [])]
    rows = preferences({"benchmarks": benchmarks})
    text = markdown(rows, ", ".join(p.name for p in found) or "no benchmark file")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
