"""`slimtune profile`: memory, FLOPs, bytes and (modelled or measured) step time of every method.

On the meta device (the default without a GPU) nothing is allocated: `accounting.account_step`
gives exact bytes of weights, trainable parameters, gradients, optimizer state and the tensors
saved for backward (by module kind), the peak of live bytes, FLOPs and bytes moved, and a step
time modelled from the card's published peaks (a model, never a measurement). On CUDA the same
rows get measured numbers beside them: min/median/max step time over CUDA events and
`max_memory_allocated`, optionally a `torch.profiler` trace and a memory snapshot per method.

The card estimate of a peak adds `ALLOCATOR_OVERHEAD_GIB` to the exact live bytes: the CUDA
caching allocator's rounding and fragmentation and library workspaces, calibrated once as the gap
between the accounted and the measured floor of the anchors' TinyLlama step on an H200 (the same
gap, within 0.01 GiB, for full fine-tuning and both PEFT rows). Other shapes may differ.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import slimtune
import torch

from . import accounting
from .bench import (
    DTYPES,
    METHODS,
    PRESETS,
    MethodOptions,
    build_model,
    count_trainable,
    model_config,
    package_version,
    train_step,
)

GiB = 2**30
ALLOCATOR_OVERHEAD_GIB = 1.04
DEFAULT_METHODS = ("floor", "paca", "s2ft", "lora", "hydra", "peft-lora", "peft-lora-bf16", "full")
BASELINES = ("floor", "peft-lora", "peft-lora-bf16", "full")  # every row gets its ratio to these


@dataclass
class Row:
    method: str
    trainable_params: int = 0
    weights: float = 0.0  # GiB, here and below
    trainable: float = 0.0
    masters: float = 0.0  # float32 trained tensors of a half-precision model (part of `trainable`)
    gradients: float = 0.0
    optimizer: float = 0.0
    saved: dict[str, float] = field(default_factory=dict)
    saved_total: float = 0.0
    peak_exact: float = 0.0  # live bytes, exact
    peak_card: float = 0.0  # + allocator overhead
    forward_tflop: float = 0.0
    backward_tflop: float = 0.0
    bytes_moved_gb: float = 0.0
    modelled_ms: float = 0.0
    measured_ms: dict[str, float] | None = None  # min / median / max on the device
    measured_peak: float | None = None
    error: str | None = None
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    model: str
    batch: int
    seq: int
    dtype: str
    device: str
    card: str
    options: MethodOptions = field(default_factory=MethodOptions)
    warmup: int = 3
    steps: int = 10
    trace: bool = False
    memory_snapshot: bool = False


def _batch(config, setup: Setup, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(setup.options.seed + 1)
    ids = torch.randint(0, config.vocab_size, (setup.batch, setup.seq), generator=generator)
    if device.type == "meta":
        ids = torch.empty_like(ids, device="meta")
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def account(method: str, setup: Setup, config) -> Row:
    """The exact accounting of one method on the meta device."""
    dtype = DTYPES[setup.dtype]
    model = build_model(config, torch.device("meta"), dtype, setup.options.seed)
    with slimtune.on_meta():
        model, optimizer = METHODS[method](model, setup.options)
    step = accounting.account_step(model, optimizer, _batch(config, setup, torch.device("meta")))
    card = accounting.CARDS[setup.card]
    return Row(
        method=method,
        trainable_params=step.trainable_count,
        weights=step.weights / GiB,
        trainable=step.trainable / GiB,
        masters=step.masters / GiB,
        gradients=step.gradients / GiB,
        optimizer=step.optimizer / GiB,
        saved={kind: size / GiB for kind, size in step.saved.items()},
        saved_total=step.saved_total / GiB,
        peak_exact=step.peak / GiB,
        peak_card=step.peak / GiB + ALLOCATOR_OVERHEAD_GIB,
        forward_tflop=step.forward_flops / 1e12,
        backward_tflop=step.backward_flops / 1e12,
        bytes_moved_gb=step.bytes_moved / 1e9,
        modelled_ms=accounting.modelled_ms(step, card, dtype),
    )


def measure(row: Row, method: str, setup: Setup, config, out: Path) -> None:
    """Measured step time (CUDA events; host clock on CPU) and, on CUDA, peak memory, beside the model."""
    device = torch.device(setup.device)
    model = build_model(config, device, DTYPES[setup.dtype], setup.options.seed)
    model, optimizer = METHODS[method](model, setup.options)
    batch = _batch(config, setup, device)
    row.trainable_params = count_trainable(model)
    for _ in range(setup.warmup):
        train_step(model, optimizer, batch)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if setup.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        for _ in range(setup.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            train_step(model, optimizer, batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        row.measured_peak = torch.cuda.max_memory_allocated(device) / GiB
        if setup.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(out / f"memory-{method}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
    else:
        for _ in range(setup.steps):
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            times.append((time.perf_counter() - start) * 1e3)
    row.measured_ms = {"min": min(times), "median": statistics.median(times), "max": max(times)}
    if setup.trace:
        with torch.profiler.profile(record_shapes=True, profile_memory=True) as prof:
            train_step(model, optimizer, batch)
        prof.export_chrome_trace(str(out / f"trace-{method}.json"))


def _add_ratios(rows: list[Row]) -> None:
    by_name = {r.method: r for r in rows if r.error is None}
    for row in rows:
        for base in BASELINES:
            ref = by_name.get(base)
            if ref is None or row.error is not None:
                continue
            ratio = {"peak": row.peak_card / ref.peak_card, "modelled_ms": row.modelled_ms / ref.modelled_ms}
            if row.measured_ms and ref.measured_ms:
                ratio["measured_ms"] = row.measured_ms["median"] / ref.measured_ms["median"]
            if row.measured_peak and ref.measured_peak:
                ratio["measured_peak"] = row.measured_peak / ref.measured_peak
            row.ratios[base] = ratio


def profile(
    model: str = "tinyllama-1.1b",
    batch: int = 8,
    seq: int = 2048,
    dtype: str = "bf16",
    methods: tuple[str, ...] | list[str] = DEFAULT_METHODS,
    device: str = "meta",
    card: str = "h200",
    out: str | Path | None = None,
    options: MethodOptions | None = None,
    **measure_options: Any,
) -> dict[str, Any]:
    """Account (and on a real device, measure) every method; write table, CSV, JSON and PNG to `out`.

    Returns the report (also `report.json`). `out` None: `profiles/<model>-<batch>x<seq>-<dtype>`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if card not in accounting.CARDS:
        raise ValueError(f"unknown card {card!r}; choose from {', '.join(accounting.CARDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    setup = Setup(model, batch, seq, dtype, device, card, options or MethodOptions(), **measure_options)
    config = model_config(model)
    name = Path(model).stem if model not in PRESETS else model
    folder = Path(out) if out is not None else Path("profiles") / f"{name}-{batch}x{seq}-{dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        print(f"[profile] {method} ...", file=sys.stderr, flush=True)
        try:
            row = account(method, setup, config)
            if device != "meta":
                measure(row, method, setup, config, folder)
        except Exception as err:  # one method's failure (e.g. out of memory) is that row's error
            row = Row(method, error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}")
        rows.append(row)
    _add_ratios(rows)
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "setup": {**asdict(setup), "options": asdict(setup.options)},
        "card_model": asdict(accounting.CARDS[card]),
        "allocator_overhead_gib": ALLOCATOR_OVERHEAD_GIB,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "peft": package_version("peft"),
            "slimtune": slimtune.__version__,
        },
        "notes": [
            "peak_exact: live bytes of the step, exact (meta-device accounting)",
            f"peak_card: peak_exact + {ALLOCATOR_OVERHEAD_GIB} GiB allocator overhead (calibrated, see docs)",
            "modelled_ms: a roofline model from the card's published peaks, not a measurement",
        ],
        "rows": [asdict(r) for r in rows],
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_csv(rows, folder / "profile.csv")
    text = table(rows, setup)
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    header = [
        f"- date: {report['date']}; machine: {platform.machine()} ({platform.system()}), device {device}",
        f"- versions: {versions}",
        f"- command: `slimtune profile --model {model} --batch {batch} --seq {seq} --dtype {dtype} "
        f"--methods {','.join(methods)} --device {device} --card {card}`",
        "",
    ]
    (folder / "profile.md").write_text("\n".join(header) + text + "\n")
    _plot(rows, setup, folder / "profile.png")
    print(text)
    print(f"[profile] wrote {folder}/profile.md, profile.csv, report.json, profile.png", file=sys.stderr)
    return report


def longest_sequence(
    method: str, model: str, dtype: str, budget_gib: float, options: MethodOptions | None = None,
    limit: int = 1 << 20,
) -> int:  # fmt: skip
    """The longest sequence at batch 1 whose accounted card peak fits `budget_gib` (a model, by
    bisection over the meta-device accounting; multiples of 128 tokens), or 0 if none does."""
    config = model_config(model)
    options = options or MethodOptions()

    def fits(seq: int) -> bool:
        setup = Setup(model, 1, seq, dtype, "meta", "h200", options)
        return account(method, setup, config).peak_card <= budget_gib

    low, high = 0, 128
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 128:
        mid = (low + high) // 2 // 128 * 128
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def longest_table(model: str, dtype: str, budget_gib: float, methods: list[str], out: Path) -> str:
    """Longest batch-1 sequence per method within `budget_gib`, and its ratio to PEFT LoRA's."""
    lengths = {}
    for method in methods:
        print(f"[profile] longest sequence: {method} ...", file=sys.stderr, flush=True)
        lengths[method] = longest_sequence(method, model, dtype, budget_gib)
    base = lengths.get("peft-lora")
    versions = ", ".join(
        [
            f"torch {torch.__version__}",
            f"transformers {package_version('transformers')}",
            f"slimtune {slimtune.__version__}",
        ]
    )
    lines = [
        f"Longest sequence at batch 1 within {budget_gib:g} GiB ({model}, {dtype}; accounted peak on the "
        "card, a model by bisection to 128 tokens, not a measurement)",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"machine: {platform.machine()}, meta device (no GPU)",
        f"- versions: {versions}",
        f"- command: `slimtune profile --model {model} --dtype {dtype} --longest {budget_gib:g} "
        f"--methods {','.join(methods)}`",
        "",
        "| method | tokens | x PEFT LoRA |",
        "|---|---|---|",
        *(f"| {m} | {n} | {n / base:.2f} |" if base else f"| {m} | {n} | - |" for m, n in lengths.items()),
    ]
    text = "\n".join(lines) + "\n"
    (out / "longest.md").write_text(text)
    (out / "longest.json").write_text(
        json.dumps({"budget_gib": budget_gib, "tokens": lengths}, indent=2) + "\n"
    )
    return text


def _write_csv(rows: list[Row], path: Path) -> None:
    kinds = accounting.KINDS
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["method", "trainable_params", "weights_gib", "trainable_gib", "masters_gib", "gradients_gib",
             "optimizer_gib", *[f"saved_{k.replace(' ', '_')}_gib" for k in kinds], "saved_total_gib",
             "peak_exact_gib", "peak_card_gib", "forward_tflop", "backward_tflop", "bytes_moved_gb",
             "modelled_ms", "measured_ms_min", "measured_ms_median", "measured_ms_max", "measured_peak_gib",
             "error"]
        )  # fmt: skip
        for r in rows:
            m = r.measured_ms or {}
            writer.writerow(
                [r.method, r.trainable_params, r.weights, r.trainable, r.masters, r.gradients, r.optimizer,
                 *[r.saved.get(k, 0.0) for k in kinds], r.saved_total, r.peak_exact, r.peak_card,
                 r.forward_tflop, r.backward_tflop, r.bytes_moved_gb, r.modelled_ms,
                 m.get("min"), m.get("median"), m.get("max"), r.measured_peak, r.error or ""]
            )  # fmt: skip


def _ratio(row: Row, base: str, key: str = "peak") -> str:
    value = row.ratios.get(base, {}).get(key)
    return f"{value:.3f}" if value is not None else "-"


def table(rows: list[Row], setup: Setup) -> str:
    card = accounting.CARDS[setup.card].name
    lines = [
        f"slimtune profile: {setup.model}, batch {setup.batch} x {setup.seq} tokens, {setup.dtype}, "
        f"accounted on meta; time modelled for {card} (a model, not a measurement)",
        "",
        "| method | trainable | weights | params+grads+opt | of which fp32 masters | saved for backward "
        "| peak (exact) | peak on card | x floor | x PEFT LoRA | x full | TFLOP fwd+bwd | modelled ms "
        "| x floor |" + (" measured ms min/med/max | measured peak |" if setup.device != "meta" else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        + ("---|---|" if setup.device != "meta" else ""),
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | error: {r.error} |")
            continue
        state = r.trainable + r.gradients + r.optimizer
        line = (
            f"| {r.method} | {r.trainable_params / 1e6:.1f} M | {r.weights:.2f} | {state:.2f} "
            f"| {2 * r.masters:.3f} | {r.saved_total:.2f} | {r.peak_exact:.2f} | {r.peak_card:.2f} "
            f"| {_ratio(r, 'floor')} "
            f"| {_ratio(r, 'peft-lora')} | {_ratio(r, 'full')} | {r.forward_tflop + r.backward_tflop:.1f} "
            f"| {r.modelled_ms:.1f} | {_ratio(r, 'floor', 'modelled_ms')} |"
        )
        if setup.device != "meta" and r.measured_ms:
            m = r.measured_ms
            peak = "-"
            if r.measured_peak is not None:  # the accounting's error against the measurement
                peak = f"{r.measured_peak:.2f} (accounted {r.peak_card / r.measured_peak - 1:+.1%})"
            line += f" {m['min']:.1f} / {m['median']:.1f} / {m['max']:.1f} | {peak} |"
        lines.append(line)
    lines += [
        "",
        "Memory in GiB. fp32 masters: float32 trained tensors of a half-precision model and their "
        "float32 gradients (PaCA/S2FT masters, on by default: `fp32_master=False` stores the trained "
        "entries in the weight's dtype; float32 LoRA adapters). Saved for backward, by module kind (GiB):",
        "",
        "| method | " + " | ".join(accounting.KINDS) + " |",
        "|---|" + "---|" * len(accounting.KINDS),
    ]
    for r in rows:
        if not r.error:
            lines.append(
                f"| {r.method} | " + " | ".join(f"{r.saved.get(k, 0.0):.2f}" for k in accounting.KINDS) + " |"
            )
    return "\n".join(lines)


def _plot(rows: list[Row], setup: Setup, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error]
    if not ok:
        return
    parts = [
        ("weights", lambda r: r.weights),
        ("trainable + grads + optimizer", lambda r: r.trainable + r.gradients + r.optimizer),
        *[(f"saved: {k}", lambda r, k=k: r.saved.get(k, 0.0)) for k in accounting.KINDS],
    ]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    names = [r.method for r in ok]
    bottom = [0.0] * len(ok)
    colors = plt.get_cmap("tab20").colors
    for i, (label, value) in enumerate(parts):
        heights = [value(r) for r in ok]
        if any(heights):
            ax_mem.bar(names, heights, bottom=bottom, label=label, color=colors[i % len(colors)])
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    transient = [max(r.peak_card - b, 0.0) for r, b in zip(ok, bottom, strict=True)]
    ax_mem.bar(names, transient, bottom=bottom, label="transients + allocator overhead", color="lightgrey")
    ax_mem.set_ylabel("GiB")
    ax_mem.set_title(
        f"Peak memory per step (accounted): {setup.model}, {setup.batch}x{setup.seq}, {setup.dtype}"
    )
    ax_mem.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.setp(ax_mem.get_xticklabels(), rotation=50, ha="right")
    ax_time.bar(names, [r.modelled_ms for r in ok], color="tab:blue", label="modelled")
    if any(r.measured_ms for r in ok):
        ax_time.scatter(names, [r.measured_ms["median"] if r.measured_ms else float("nan") for r in ok],
                        color="black", zorder=3, label="measured median")  # fmt: skip
    ax_time.set_ylabel("ms per step")
    ax_time.set_title(f"Step time, roofline model for {accounting.CARDS[setup.card].name}")
    ax_time.legend(fontsize=7)
    plt.setp(ax_time.get_xticklabels(), rotation=50, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """`slimtune profile` (arguments defined in cli.py, which imports nothing heavy)."""
    device = args.profile_device or ("cuda" if torch.cuda.is_available() else "meta")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.longest is not None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            print(f"slimtune profile: unknown method(s) {unknown}", file=sys.stderr)
            return 2
        name = Path(args.model).stem if args.model not in PRESETS else args.model
        out = Path(args.out) if args.out else Path("profiles") / f"{name}-longest-{args.dtype}"
        out.mkdir(parents=True, exist_ok=True)
        print(longest_table(args.model, args.dtype, args.longest, methods, out))
        return 0
    try:
        profile(
            model=args.model,
            batch=args.batch,
            seq=args.seq,
            dtype=args.dtype,
            methods=methods,
            device=device,
            card=args.card,
            out=args.out,
            options=MethodOptions(paca_r=args.paca_r, lora_r=args.lora_r),
            warmup=args.warmup,
            steps=args.steps,
            trace=args.trace,
            memory_snapshot=args.memory_snapshot,
        )
    except ValueError as err:
        print(f"slimtune profile: {err}", file=sys.stderr)
        return 2
    return 0
