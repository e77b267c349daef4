"""`slimtune profile`: memory, FLOPs, bytes and (modelled or measured) step time of every method.

On the meta device (the default without a GPU) nothing is allocated: `accounting.account_step`
gives exact bytes of weights, trainable parameters, gradients, optimizer state and the tensors
saved for backward (by module kind), the peak of live bytes, FLOPs and bytes moved, and a step
time modelled from the card's published peaks (a model, never a measurement). On CUDA the same
rows get measured numbers beside them: min/median/max step time over CUDA events and
`max_memory_allocated`, optionally a `torch.profiler` trace and a memory snapshot per method.

The card estimate of a peak adds an allocator allowance to the exact live bytes, one per path
(`ALLOWANCE_GIB`): what the CUDA caching allocator, library workspaces and the kernels' own buffers
add to the live bytes a dispatch mode sees. The HF path's (1.04 GiB) is the gap between the
accounted and the measured floor of the anchors' TinyLlama step on an H200 (the same gap, within
0.01 GiB, for full fine-tuning and both PEFT rows): mostly the loss's float32 logits and the eager
kernels' workspaces. The fused path's (rows with `+lean`; 0.05 GiB) is the gap for the anchors'
Liger-patched floor, whose program keeps the tensors lean mode keeps (read from both codes) and
differs at its peak only by forming the whole gated MLP product at once: accounted as lean mode
with unbounded token chunks (`benchmarks/calibrate_allowance.py`). Other shapes may differ.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import slimtune
import torch
from slimtune import files

from . import accounting, quantize, sharded_memory
from .bench import (
    CHECKPOINTING,
    DTYPES,
    METHODS,
    PRESETS,
    MethodOptions,
    build_model,
    count_trainable,
    enable_checkpointing,
    model_config,
    package_version,
    summary,
    train_step,
)

GiB = 2**30
ALLOWANCE_GIB = {"hf": 1.04, "fused": 0.05}  # calibrated on the H200 anchors (module docstring)


def allowance_gib(method: str) -> float:
    """The allocator allowance of a row: the fused path's for lean rows, else the HF path's."""
    return ALLOWANCE_GIB["fused" if method.endswith("+lean") else "hf"]


DEFAULT_METHODS = ("floor", "paca", "s2ft", "lora", "hydra", "peft-lora", "peft-lora-bf16", "full")
ON_4BIT = ("floor", "paca", "lora", "hydra", "peft-lora", "peft-lora-bf16")  # rows that train on a 4-bit base
QUANT_ROWS = (
    "- on the 4-bit base, paca is QPaCA (bitsandbytes' 4-bit product plus one correction product; the "
    "columns a float32 master beside the frozen 4-bit weight, with their dequantized initial values) and "
    "lora is QLoRA and hydra QHydra (the 4-bit product beside the adapters' products; float32 adapters); "
    "weights include the quantization state"
)
BASELINES = ("floor", "peft-lora", "peft-lora-bf16", "full")  # every row gets its ratio to these


@dataclass
class Row:
    method: str
    checkpointing: str = "off"  # HF gradient checkpointing: off, reentrant, non-reentrant
    trainable_params: int = 0
    weights: float = 0.0  # GiB, here and below: every parameter and buffer, trained or frozen
    trainable: float = 0.0  # of `weights`: the trained parameters
    masters: float = 0.0  # float32 trained tensors of a half-precision model (part of `trainable`)
    gradients: float = 0.0
    optimizer: float = 0.0
    saved: dict[str, float] = field(default_factory=dict)
    saved_total: float = 0.0
    peak_exact: float = 0.0  # live bytes, exact
    peak_parts: dict[str, float] = field(default_factory=dict)  # what is live at the peak (sums to it)
    peak_card: float = 0.0  # + the path's allocator allowance
    forward_tflop: float = 0.0
    backward_tflop: float = 0.0
    bytes_moved_gb: float = 0.0
    modelled_ms: float = 0.0
    measured_ms: dict[str, float] | None = None  # min / median / max on the device
    measured_peak: float | None = None  # CUDA: max_memory_allocated; CPU: the allocator's peak (profiler)
    error: str | None = None
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    rank: dict[str, float] = field(default_factory=dict)  # FSDP2 (world > 1): rank 0's share, GiB

    @property
    def label(self) -> str:
        return self.method if self.checkpointing == "off" else f"{self.method} (gc {self.checkpointing})"


@dataclass(frozen=True)
class Setup:
    model: str
    batch: int
    seq: int
    dtype: str
    device: str
    card: str
    options: MethodOptions = field(default_factory=MethodOptions)
    checkpointing: str = "off"
    warmup: int = 3
    steps: int = 10
    trace: bool = False
    memory_snapshot: bool = False
    world: int = 1  # > 1: also what each of `world` FSDP2 processes holds (sharded_memory)
    quant: str = "none"  # or a 4-bit format of apps.quantize: every linear but the LM head quantized


def _batch(config, setup: Setup, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(setup.options.seed + 1)
    ids = torch.randint(0, config.vocab_size, (setup.batch, setup.seq), generator=generator)
    if device.type == "meta":
        ids = torch.empty_like(ids, device="meta")
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def _prepared(method: str, setup: Setup, config, device: torch.device):
    """A fresh model of `config` on `device`, checkpointed as the setup says, prepared for `method`."""
    model = build_model(config, device, DTYPES[setup.dtype], setup.options.seed)
    if setup.quant != "none":
        quantize.quantize(model, setup.quant)
    enable_checkpointing(model, setup.checkpointing)
    if device.type != "meta":
        return METHODS[method](model, setup.options)
    with slimtune.on_meta():
        return METHODS[method](model, setup.options)


def account(method: str, setup: Setup, config) -> Row:
    """The exact accounting of one method on the meta device."""
    model, optimizer = _prepared(method, setup, config, torch.device("meta"))
    models = "cpu" if setup.device == "cpu" else "cuda"  # a CPU measurement compares with the CPU's program
    step = accounting.account_step(
        model, optimizer, _batch(config, setup, torch.device("meta")), models=models
    )
    rank = {}
    if setup.world > 1:
        share = sharded_memory.rank_share(model, optimizer, setup.world)
        at_peak = step.peak_parts.get("gradients", 0)
        peak = share.peak(step.peak, step.weights, at_peak, step.gradients, step.optimizer)
        parts = {"weights": share.weights, "gradients": share.gradients, "optimizer": share.optimizer}
        rank = {k: v / GiB for k, v in {**parts, "unsharded": share.unsharded, "peak": peak}.items()}
    return Row(
        method=method,
        checkpointing=setup.checkpointing,
        trainable_params=step.trainable_count,
        weights=step.weights / GiB,
        trainable=step.trainable / GiB,
        masters=step.masters / GiB,
        gradients=step.gradients / GiB,
        optimizer=step.optimizer / GiB,
        saved={kind: size / GiB for kind, size in step.saved.items()},
        saved_total=step.saved_total / GiB,
        peak_exact=step.peak / GiB,
        peak_parts={part: size / GiB for part, size in step.peak_parts.items()},
        peak_card=step.peak / GiB + allowance_gib(method),
        forward_tflop=step.forward_flops / 1e12,
        backward_tflop=step.backward_flops / 1e12,
        bytes_moved_gb=step.bytes_moved / 1e9,
        modelled_ms=accounting.modelled_ms(step, accounting.CARDS[setup.card]),
        rank=rank,
    )


def cpu_peak(model: torch.nn.Module, optimizer, batch: dict[str, torch.Tensor]) -> int:
    """The CPU allocator's peak over one training step, in bytes: what is live before it (the model's
    tensors, optimizer state, the batch) plus the highest running sum of the allocations and frees that
    `torch.profiler` records during it (the bytes each tensor asked for, as the accounting counts)."""
    before = accounting.storage_bytes(
        [*accounting.model_tensors(model), *accounting.optimizer_state(optimizer), *batch.values()]
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        train_step(model, optimizer, batch)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return before + peak


def _timed_steps(model, optimizer, batch, setup: Setup, device: torch.device) -> list[float]:
    """Each timed step's milliseconds: CUDA events on a card, the host clock elsewhere."""
    times = []
    for _ in range(setup.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            train_step(model, optimizer, batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            train_step(model, optimizer, batch)
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def measure(row: Row, method: str, setup: Setup, config, out: Path) -> None:
    """Measured step time (CUDA events; host clock on CPU) and peak memory, beside the accounting."""
    device = torch.device(setup.device)
    model, optimizer = _prepared(method, setup, config, device)
    batch = _batch(config, setup, device)
    row.trainable_params = count_trainable(model)
    for _ in range(max(setup.warmup, 1)):  # one step at least: the optimizer state exists from then on
        train_step(model, optimizer, batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if setup.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
    else:
        row.measured_peak = cpu_peak(model, optimizer, batch) / GiB
    times = _timed_steps(model, optimizer, batch, setup, device)
    if cuda:
        row.measured_peak = torch.cuda.max_memory_allocated(device) / GiB
        if setup.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(out / f"memory-{method}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
    row.measured_ms = {"min": min(times), "median": statistics.median(times), "max": max(times)}
    if setup.trace:
        with torch.profiler.profile(record_shapes=True, profile_memory=True) as prof:
            train_step(model, optimizer, batch)
        prof.export_chrome_trace(str(out / f"trace-{method}.json"))


def _add_ratios(rows: list[Row]) -> None:
    """Each row's ratios to the baselines accounted with the same checkpointing."""
    by_name = {(r.method, r.checkpointing): r for r in rows if r.error is None}
    for row in rows:
        row.ratios = {}
        for base in BASELINES:
            ref = by_name.get((base, row.checkpointing))
            if ref is None or row.error is not None:
                continue
            ratio = {"peak": row.peak_card / ref.peak_card, "modelled_ms": row.modelled_ms / ref.modelled_ms}
            if row.measured_ms and ref.measured_ms:
                ratio["measured_ms"] = row.measured_ms["median"] / ref.measured_ms["median"]
            if row.measured_peak and ref.measured_peak:
                ratio["measured_peak"] = row.measured_peak / ref.measured_peak
            row.ratios[base] = ratio


def _base_row(method: str) -> str:
    """The row a variant builds on: `paca+lean` and `paca-partial-adamw` are `paca`'s."""
    return method.removesuffix("+lean").removesuffix("-partial-adamw")


def _check_quant(methods, quant: str) -> None:
    if quant != "none" and quant not in quantize.FORMATS:
        raise ValueError(f"unknown --quant {quant!r}; choose from none, {', '.join(quantize.FORMATS)}")
    dense_only = [m for m in methods if quant != "none" and _base_row(m) not in ON_4BIT]
    if dense_only:
        raise ValueError(
            f"--quant {quant}: {dense_only} need dense weights (the 4-bit weights stay frozen; S2FT is "
            f"refused on 4-bit bases); rows on a 4-bit base: {', '.join(ON_4BIT)} and their +lean variants"
        )


def _check(methods, device: str, card: str, dtype: str, checkpointing, quant: str = "none") -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    _check_quant(methods, quant)
    if card not in accounting.CARDS:
        raise ValueError(f"unknown card {card!r}; choose from {', '.join(accounting.CARDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    bad = [c for c in checkpointing if c not in CHECKPOINTING]
    if bad:
        raise ValueError(f"unknown checkpointing mode(s) {bad}; choose from {', '.join(CHECKPOINTING)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")


def _row(method: str, setup: Setup, config, folder: Path) -> Row:
    """Account (and on a device, measure) one row; its failure (e.g. out of memory) is its error."""
    try:
        row = account(method, setup, config)
        if setup.device != "meta":
            measure(row, method, setup, config, folder)
    except Exception as err:  # the other rows still run
        first = (str(err).splitlines() or [""])[0][:300]
        row = Row(method, checkpointing=setup.checkpointing, error=f"{type(err).__name__}: {first}")
    return row


def _progress(row: Row) -> str:
    if row.error:
        return f"[profile] {row.label}: {row.error}"
    line = f"[profile] {row.label}: accounted peak {row.peak_exact:.3f} GiB, {row.peak_card:.2f} on a card"
    if row.measured_peak is not None:
        line += f", measured {row.measured_peak:.3f} GiB"
    if row.measured_ms:
        line += f", {row.measured_ms['median']:.1f} ms/step measured"
    return line + f", {row.modelled_ms:.1f} ms modelled"


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
    checkpointing: tuple[str, ...] | list[str] = ("off",),
    **measure_options: Any,
) -> dict[str, Any]:
    """Account (and on a real device, measure) every method under every checkpointing mode; write
    table, CSV and JSON to `out` after every row (a run cut short keeps its finished rows), and the
    plot at the end. Returns the report (also `report.json`). `out` None:
    `profiles/<model>-<batch>x<seq>-<dtype>`."""
    _check(methods, device, card, dtype, checkpointing, measure_options.get("quant", "none"))
    setup = Setup(model, batch, seq, dtype, device, card, options or MethodOptions(), **measure_options)
    config = model_config(model)
    name = Path(model).stem if model not in PRESETS else model
    quant = "" if setup.quant == "none" else f"-{setup.quant}"
    folder = Path(out) if out is not None else Path("profiles") / f"{name}-{batch}x{seq}-{dtype}{quant}"
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for mode in checkpointing:
        for method in methods:
            print(f"[profile] {method} (checkpointing {mode}) ...", file=sys.stderr, flush=True)
            rows.append(_row(method, replace(setup, checkpointing=mode), config, folder))
            print(_progress(rows[-1]), file=sys.stderr, flush=True)
            _add_ratios(rows)
            report = _write(rows, setup, methods, checkpointing, folder)
    _plot(rows, setup, folder / "profile.png")
    print(table(rows, setup))
    print(f"[profile] wrote {folder}/profile.md, profile.csv, report.json, profile.png", file=sys.stderr)
    return report


def _write(rows: list[Row], setup: Setup, methods, checkpointing, folder: Path) -> dict[str, Any]:
    """report.json, profile.csv and profile.md of the rows so far (each file replaced atomically)."""
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "setup": {**asdict(setup), "options": asdict(setup.options), "checkpointing": list(checkpointing)},
        "card_model": asdict(accounting.CARDS[setup.card]),
        "allowance_gib": ALLOWANCE_GIB,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "peft": package_version("peft"),
            "slimtune": slimtune.__version__,
            **({"bitsandbytes": package_version("bitsandbytes")} if setup.quant != "none" else {}),
        },
        "notes": [
            "peak_exact: live bytes of the step, exact (meta-device accounting)",
            "peak_parts: what is live at that peak, by part (sums to peak_exact)",
            f"peak_card: peak_exact + the path's allocator allowance, {ALLOWANCE_GIB['hf']} GiB (HF path) or "
            f"{ALLOWANCE_GIB['fused']} GiB (+lean rows), calibrated on the H200 anchors (see docs)",
            "modelled_ms: a roofline model from the card's published peaks, per kernel max(FLOPs/peak, "
            "bytes/bandwidth); not a measurement",
            *([_RANK_NOTE.format(world=setup.world)] if setup.world > 1 else []),
            *[f"{m}: {summary(METHODS[m])}" for m in methods],
        ],
        "rows": [{**asdict(r), "label": r.label} for r in rows],
    }
    files.write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
    _write_csv(rows, folder / "profile.csv")
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    command = (
        f"slimtune profile --model {setup.model} --batch {setup.batch} --seq {setup.seq} --dtype "
        f"{setup.dtype} --methods {','.join(methods)} --device {setup.device} --card {setup.card}"
        + (f" --checkpointing {','.join(checkpointing)}" if list(checkpointing) != ["off"] else "")
        + (f" --world-size {setup.world}" if setup.world > 1 else "")
        + (f" --quant {setup.quant}" if setup.quant != "none" else "")
    )
    header = [
        f"- date: {report['date']}; machine: {platform.machine()} ({platform.system()}), "
        f"device {setup.device}",
        f"- versions: {versions}",
        f"- command: `{command}`",
        "",
    ]
    files.write_text(folder / "profile.md", "\n".join(header) + table(rows, setup) + "\n")
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


RANK_COLUMNS = ("weights", "gradients", "optimizer", "unsharded", "peak")  # FSDP2 rank 0 (--world-size)
_RANK_NOTE = (
    "rank: what rank 0 of {world} FSDP2 processes holds; weights, gradients, optimizer: its shards, "
    "exact; unsharded, peak: a model of what FSDP2 gathers during the step"
)


def _write_csv(rows: list[Row], path: Path) -> None:
    kinds, parts = accounting.KINDS, accounting.PARTS
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["method", "checkpointing", "trainable_params", "weights_gib", "trainable_gib", "masters_gib",
         "gradients_gib", "optimizer_gib", *[f"saved_{k.replace(' ', '_')}_gib" for k in kinds],
         "saved_total_gib", *[f"at_peak_{p.replace(' ', '_')}_gib" for p in parts], "peak_exact_gib",
         "peak_card_gib", "forward_tflop", "backward_tflop", "bytes_moved_gb", "modelled_ms",
         "measured_ms_min", "measured_ms_median", "measured_ms_max", "measured_peak_gib",
         *[f"rank_{k}_gib" for k in RANK_COLUMNS], "error"]
    )  # fmt: skip
    for r in rows:
        m = r.measured_ms or {}
        writer.writerow(
            [r.method, r.checkpointing, r.trainable_params, r.weights, r.trainable, r.masters, r.gradients,
             r.optimizer, *[r.saved.get(k, 0.0) for k in kinds], r.saved_total,
             *[r.peak_parts.get(p, 0.0) for p in parts], r.peak_exact, r.peak_card, r.forward_tflop,
             r.backward_tflop, r.bytes_moved_gb, r.modelled_ms, m.get("min"), m.get("median"), m.get("max"),
             r.measured_peak, *[r.rank.get(k) for k in RANK_COLUMNS], r.error or ""]
        )  # fmt: skip
    files.write_text(path, buffer.getvalue())


def _ratio(row: Row, base: str, key: str = "peak") -> str:
    value = row.ratios.get(base, {}).get(key)
    return f"{value:.3f}" if value is not None else "-"


def _measured(row: Row, device: str) -> str:
    """The measured cells: times, and the peak with the accounting's error against it (against the
    card's peak on CUDA, whose caching allocator adds its overhead; against the exact peak on CPU)."""
    if not row.measured_ms:
        return " - | - |"
    m = row.measured_ms
    peak = "-"
    if row.measured_peak is not None:
        accounted = row.peak_card if device == "cuda" else row.peak_exact
        peak = f"{row.measured_peak:.4f} (accounted {accounted / row.measured_peak - 1:+.3%})"
    return f" {m['min']:.1f} / {m['median']:.1f} / {m['max']:.1f} | {peak} |"


def _line(r: Row, device: str) -> str:
    if r.error:
        return f"| {r.label} | error: {r.error} |"
    line = (
        f"| {r.label} | {r.trainable_params / 1e6:.1f} M | {r.weights:.2f} | {r.gradients + r.optimizer:.2f} "
        f"| {2 * r.masters:.3f} | {r.saved_total:.2f} | {r.peak_exact:.2f} | {r.peak_card:.2f} "
        f"| {_ratio(r, 'floor')} | {_ratio(r, 'peft-lora')} | {_ratio(r, 'full')} "
        f"| {r.forward_tflop + r.backward_tflop:.1f} | {r.modelled_ms:.1f} "
        f"| {_ratio(r, 'floor', 'modelled_ms')} |"
    )
    return line + (_measured(r, device) if device != "meta" else "")


def _quant_words(quant: str) -> str:
    if quant == "none":
        return ""
    quant_type, double = quantize.FORMATS[quant]
    nested = " with double quantization" if double else ""
    return f", every linear but the LM head 4-bit (bitsandbytes {quant_type.upper()}{nested})"


def table(rows: list[Row], setup: Setup) -> str:
    card = accounting.CARDS[setup.card].name
    measured = setup.device != "meta"
    lines = [
        f"slimtune profile: {_model_name(setup.model)}, batch {setup.batch} x {setup.seq} tokens, "
        f"{setup.dtype}{_quant_words(setup.quant)}, accounted on meta; time modelled for {card} (a model, "
        "not a measurement)",
        "",
        "| method | trainable | weights | grads + optimizer | fp32 masters + grads | saved for backward "
        "| peak (exact) | peak on card | x floor | x PEFT LoRA | x full | TFLOP fwd+bwd | modelled ms "
        "| x floor |" + (" measured ms min/med/max | measured peak |" if measured else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if measured else ""),
        *[_line(r, setup.device) for r in rows],
        "",
        "Memory in GiB. weights: every parameter and buffer of the model, trained or frozen (a full "
        "fine-tune's trained weights too). fp32 masters + grads: float32 trained tensors of a "
        "half-precision model and their float32 gradients (PaCA/S2FT masters, on by default: "
        "`fp32_master=False` stores the trained entries in the weight's dtype; float32 LoRA adapters). "
        f"peak on card: the exact peak plus an allocator allowance calibrated on the H200 anchors, "
        f"{ALLOWANCE_GIB['hf']} GiB for HF's frozen path, {ALLOWANCE_GIB['fused']} GiB for the fused one "
        "(+lean rows; calibrated on Liger's floor). Ratios compare rows with the same checkpointing. Rows:",
        "",
        *[f"- {m}: {summary(METHODS[m])}" for m in dict.fromkeys(r.method for r in rows)],
        *([QUANT_ROWS] if setup.quant != "none" else []),
        "",
        "Live at the peak (GiB; the parts sum to the exact peak):",
        "",
        *_breakdown(rows, accounting.PARTS, lambda r: r.peak_parts),
        "",
        "Saved for backward, by module kind (GiB; what checkpointing's own hooks keep is not seen here):",
        "",
        *_breakdown(rows, accounting.KINDS, lambda r: r.saved),
        *_per_rank(rows, setup),
    ]
    return "\n".join(lines)


def _per_rank(rows: list[Row], setup: Setup) -> list[str]:
    """The FSDP2 section: what rank 0 (the largest shard) of `setup.world` processes holds."""
    if setup.world == 1:
        return []
    lines = [
        "",
        f"Per process under FSDP2 with {setup.world} processes (GiB, rank 0: the largest shard; `--batch` "
        "is each process's). weights, gradients, optimizer: the shards, exact. unsharded and peak are a "
        "model: what FSDP2 gathers during the step (the root's own parameters, two blocks, one block's "
        "gradients) added to the 1-process peak less what sharding saves:",
        "",
        "| method | weights | gradients | optimizer | unsharded (model) | peak (model) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.rank:
            values = (r.rank[k] for k in RANK_COLUMNS)
            lines.append(f"| {r.label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines


def _breakdown(
    rows: list[Row], columns: tuple[str, ...], values: Callable[[Row], dict[str, float]]
) -> list[str]:
    """A Markdown table of one GiB breakdown per row (rows that failed left out)."""
    return [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *[f"| {r.label} | " + " | ".join(f"{values(r).get(c, 0.0):.2f}" for c in columns) + " |"
          for r in rows if not r.error],
    ]  # fmt: skip


def _model_name(model: str) -> str:
    """A preset's name, or a model folder's or config file's own name (never an absolute path)."""
    if model in PRESETS:
        return model
    path = Path(model)
    return path.parent.name if path.name == "config.json" else path.name


def _memory_panel(ax, ok: list[Row]) -> None:
    """Stacked bars of what is live at each row's peak, plus the allocator allowance: each bar's top is
    the table's peak on the card; a dashed line per card memory within reach of the bars."""
    import matplotlib.pyplot as plt

    names = [r.label for r in ok]
    bottom = [0.0] * len(ok)
    colors = plt.get_cmap("tab10").colors
    parts = [(p, [r.peak_parts.get(p, 0.0) for r in ok]) for p in accounting.PARTS]
    parts.append(("allocator allowance (calibrated)", [r.peak_card - r.peak_exact for r in ok]))
    for i, (label, heights) in enumerate(parts):
        if any(h > 0 for h in heights):
            ax.bar(names, heights, bottom=bottom, label=label, color=colors[i % len(colors)])
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    top = max(bottom)
    cards: dict[float, list[str]] = {}
    for card in accounting.CARDS.values():
        if card.memory_gib <= 2 * top:
            cards.setdefault(card.memory_gib, []).append(card.name)
    for gib, names_at in sorted(cards.items()):
        ax.axhline(gib, color="black", linestyle="--", linewidth=0.8)
        label = f"{' / '.join(names_at)}: {gib:g} GiB"
        ax.text(len(ok) - 0.5, gib, label, va="bottom", ha="right", fontsize=7)
    ax.set_ylim(0, 1.08 * max([top, *cards]))
    ax.set_ylabel("GiB")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _plot(rows: list[Row], setup: Setup, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error]
    if not ok:
        return
    width = max(12.0, 0.36 * len(ok) + 4)  # room for every row's label, one above the other panel
    fig, (ax_mem, ax_time) = plt.subplots(2, 1, figsize=(width, 11))
    _memory_panel(ax_mem, ok)
    ax_mem.set_title(
        f"Peak memory per step (accounted): {_model_name(setup.model)}, {setup.batch}x{setup.seq}, "
        f"{setup.dtype}",
        fontsize=10,
    )
    names = [r.label for r in ok]
    ax_time.bar(names, [r.modelled_ms for r in ok], color="tab:blue", label="modelled")
    if setup.device == "cuda" and any(r.measured_ms for r in ok):  # a CPU time is no card's time
        ax_time.scatter(names, [r.measured_ms["median"] if r.measured_ms else float("nan") for r in ok],
                        color="black", zorder=3, label="measured median")  # fmt: skip
        ax_time.legend(fontsize=7)
    ax_time.set_ylabel("ms per step")
    ax_time.set_title(f"Step time, roofline model for {accounting.CARDS[setup.card].name}", fontsize=10)
    for ax in (ax_mem, ax_time):
        plt.setp(ax.get_xticklabels(), rotation=50, ha="right", fontsize=8)
    fig.tight_layout()
    files.write_with(path, lambda p: fig.savefig(p, dpi=110))
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
            options=MethodOptions(paca_r=args.paca_r, lora_r=args.lora_r, lean_recompute=args.lean_recompute),
            checkpointing=[c.strip() for c in args.checkpointing.split(",") if c.strip()],
            warmup=args.warmup,
            steps=args.steps,
            trace=args.trace,
            memory_snapshot=args.memory_snapshot,
            world=args.world_size,
            quant=args.quant,
        )
    except ValueError as err:
        print(f"slimtune profile: {err}", file=sys.stderr)
        return 2
    return 0
