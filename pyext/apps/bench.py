"""`slimtune bench`: the end-to-end training-step benchmark of the H200 anchors (the protocol in
benchmarks/results/anchors-h200-2026-11-26.md), one row per method.

Every method builds a fresh random-init model from the same seed and times the same step
(forward with labels, backward, optimizer step, zero_grad), so the rows differ only in the method.
Targets are stated as ratios to the `floor` row, hence the "x floor" columns.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import slimtune
import torch
from slimtune import files
from slimtune.registry import IN_PLACE
from torch import nn

PRESETS: dict[str, dict[str, int]] = {
    "tinyllama-1.1b": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
DEFAULT_SHAPE = {"tinyllama-1.1b": (8, 2048), "tiny": (2, 64)}  # (batch, seq)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class MethodOptions:
    """The knobs a method may read; one object so the demo and the bench share the registry."""

    paca_r: int = 64  # the budget of in-place methods (PaCA columns)
    lora_r: int = 16  # the budget of adapter methods (rank; alpha = 2r)
    lr: float = 1e-4
    paca_optimizer: str = "adamw-fused"  # or "partial-adamw"
    seed: int = 0
    lean_recompute: float = 0.0  # +lean rows: slimtune.lean(model, recompute=...)


Prepared = tuple[nn.Module, torch.optim.Optimizer | None]


def adamw(params: list[nn.Parameter], options: MethodOptions) -> torch.optim.Optimizer:
    """torch AdamW, fused on CUDA as in the anchors (the CPU default path elsewhere)."""
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=options.lr, fused=fused or None)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _floor(model: nn.Module, options: MethodOptions) -> Prepared:
    """Everything frozen, input embeddings need grad: backward computes input gradients only."""
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model, None


def _registered(name: str, optimizer: str | None = None) -> Callable[[nn.Module, MethodOptions], Prepared]:
    """A registered slimtune method at the bench's budget (`MethodInfo.sized`), on every linear of
    the blocks (the 7 projections of a Llama, as the PEFT rows)."""
    method = slimtune.registry.get(name)

    def prepare(model: nn.Module, options: MethodOptions) -> Prepared:
        budget = options.paca_r if method.has(IN_PLACE) else options.lora_r
        slimtune.apply(model, method.sized(budget, options.seed))
        if (optimizer or options.paca_optimizer) == "partial-adamw" and method.has(IN_PLACE):
            return model, slimtune.PartialAdamW(model, lr=options.lr)
        return model, adamw(slimtune.trainable_parameters(model), options)

    prepare.__doc__ = method.summary + (", stepped by PartialAdamW" if optimizer == "partial-adamw" else "")
    return prepare


def _peft_lora(model: nn.Module, options: MethodOptions, autocast_adapter_dtype: bool = True) -> Prepared:
    """PEFT defaults otherwise (adapters kept in float32), as the anchors measured."""
    from peft import LoraConfig, get_peft_model

    targets = slimtune.architectures.projection_names(model)
    config = LoraConfig(
        r=options.lora_r, lora_alpha=2 * options.lora_r, lora_dropout=0.0, target_modules=targets
    )
    with warnings.catch_warnings():  # PEFT 0.21 reads transformers' deprecated alias, not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    return model, adamw(_trainable(model), options)


def _peft_lora_bf16(model: nn.Module, options: MethodOptions) -> Prepared:
    """PEFT LoRA with its adapters kept in the model's dtype (the anchors' second PEFT row)."""
    return _peft_lora(model, options, autocast_adapter_dtype=False)


def _full(model: nn.Module, options: MethodOptions) -> Prepared:
    """Every weight trained, pure in the model's dtype: weights, gradients and AdamW moments all in
    bf16 for a bf16 model (8 bytes per parameter; the anchors' full row)."""
    return model, adamw(_trainable(model), options)


class MasterWeightAdamW:
    """AdamW on float32 master copies of half-precision parameters: the model keeps computing in its
    dtype, the optimizer keeps float32 masters and moments (16 bytes of state per parameter with the
    half-precision weight and gradient: the usual mixed-precision full fine-tune). One parameter is
    stepped at a time, so only one float32 gradient exists at once."""

    def __init__(self, params: list[nn.Parameter], options: MethodOptions) -> None:
        self.params = params
        self.masters = [p.detach().to(torch.float32, copy=True) for p in params]  # a copy also in float32
        self.steps = [adamw([m], options) for m in self.masters]

    @property
    def state(self) -> dict[nn.Parameter, dict[str, Any]]:
        return {
            p: {"master": m, **step.state[m]}
            for p, m, step in zip(self.params, self.masters, self.steps, strict=True)
        }

    @torch.no_grad()
    def step(self) -> None:
        for p, master, step in zip(self.params, self.masters, self.steps, strict=True):
            if p.grad is None:
                continue
            master.grad = p.grad.float()
            step.step()
            master.grad = None
            p.copy_(master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _full_mixed(model: nn.Module, options: MethodOptions) -> Prepared:
    """Every weight trained in mixed precision: the model's dtype for weights and gradients, float32
    masters and AdamW moments in the optimizer (16 bytes per parameter)."""
    return model, MasterWeightAdamW(_trainable(model), options)  # type: ignore[return-value]


def _liger(
    prepare: Callable[[nn.Module, MethodOptions], Prepared],
) -> Callable[[nn.Module, MethodOptions], Prepared]:
    """The same row on a model patched by Liger-Kernel first (its fused RMSNorm, RoPE, SwiGLU and
    linear cross-entropy; the anchors' Liger rows), for comparison with the +lean rows and to show
    that slimtune's methods compose with it; Llama-family models, where liger-kernel is installed."""

    def prepare_liger(model: nn.Module, options: MethodOptions) -> Prepared:
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError as err:
            raise RuntimeError("liger-kernel is not installed here (pip install liger-kernel)") from err
        _apply_liger_kernel_to_instance(model=model)
        return prepare(model, options)

    prepare_liger.__doc__ = f"{summary(prepare)}; on a model patched by Liger-Kernel first"
    return prepare_liger


def summary(prepare: Callable[[nn.Module, MethodOptions], Prepared]) -> str:
    """The first sentence of a row's description (its preparing function's docstring)."""
    doc = " ".join((prepare.__doc__ or "").split())
    return doc.split(". ")[0].rstrip(".") if doc else prepare.__name__


def _lean(
    prepare: Callable[[nn.Module, MethodOptions], Prepared],
) -> Callable[[nn.Module, MethodOptions], Prepared]:
    """The same row with `slimtune.lean` on top (lean RMSNorm, gated MLP, chunked LM head + loss)."""

    def prepare_lean(model: nn.Module, options: MethodOptions) -> Prepared:
        model, optimizer = prepare(model, options)
        return slimtune.lean(model, recompute=options.lean_recompute), optimizer

    lean_note = "with slimtune.lean (lean RMSNorm, gated MLP, chunked LM head + loss)"
    prepare_lean.__doc__ = f"{summary(prepare)}; {lean_note}"
    return prepare_lean


def _methods() -> dict[str, Callable[[nn.Module, MethodOptions], Prepared]]:
    """The rows: the floor, every registered method (in-place ones also with PartialAdamW), PEFT, full;
    NAME+lean for the floor, every registered method and full; NAME+liger for the floor, PaCA and LoRA."""
    rows: dict[str, Callable[[nn.Module, MethodOptions], Prepared]] = {"floor": _floor}
    for name, method in slimtune.registry.methods().items():
        rows[name] = _registered(name)
        if method.has(IN_PLACE):
            rows[f"{name}-partial-adamw"] = _registered(name, optimizer="partial-adamw")
    rows |= {
        "peft-lora": _peft_lora,
        "peft-lora-bf16": _peft_lora_bf16,
        "full": _full,
        "full-mixed": _full_mixed,
    }
    lean = {f"{name}+lean": _lean(rows[name]) for name in ("floor", *slimtune.registry.methods(), "full")}
    liger = {f"{name}+liger": _liger(rows[name]) for name in ("floor", "paca", "lora")}
    return rows | lean | liger


# name -> (model, options) -> (model to call, optimizer or None).
METHODS = _methods()
DEFAULT_METHODS = ("floor", "paca", "peft-lora", "full")


def model_config(spec: str | dict[str, Any]):
    """A transformers config from a preset name, Llama config kwargs, a model directory or a config.json."""
    import transformers

    if isinstance(spec, dict):
        return transformers.LlamaConfig(**spec)
    if spec in PRESETS:
        return transformers.LlamaConfig(**PRESETS[spec])
    path = Path(spec)
    if path.is_dir():
        return transformers.AutoConfig.from_pretrained(path)
    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ValueError(f"{path} has no 'model_type'; it is not a transformers config.json")
        return transformers.AutoConfig.for_model(**data)
    raise ValueError(
        f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a directory or config.json"
    )


def build_model(spec, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random-init causal LM of `spec` (see `model_config`) made directly on `device` (no downloads,
    default sdpa attention; meta: no memory at all)."""
    from transformers import AutoModelForCausalLM

    config = spec if hasattr(spec, "to_dict") else model_config(spec)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


CHECKPOINTING = ("off", "reentrant", "non-reentrant")


def enable_checkpointing(model: nn.Module, mode: str) -> None:
    """HF gradient (activation) checkpointing of every decoder block, `mode` one of `CHECKPOINTING`."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing mode {mode!r}; choose from {', '.join(CHECKPOINTING)}")
    if mode == "off":
        return
    kwargs = {"use_reentrant": mode == "reentrant"}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One step as the anchors' protocol defines it; returns the detached loss (reading it syncs the
    device)."""
    loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run `fn` and return its result and wall time in ms (host clock after a CUDA sync)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in _trainable(model))


@dataclass
class Row:
    method: str
    trainable: int | None = None
    ms: float | None = None  # median
    ms_min: float | None = None
    ms_max: float | None = None
    peak_gib: float | None = None
    ms_steps: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Setup:
    preset: str
    batch: int
    seq: int
    dtype: str
    device: torch.device
    grad_checkpointing: bool
    warmup: int
    steps: int
    options: MethodOptions


def measure(method: str, setup: Setup) -> Row:
    """Build, prepare and time one method; the model is local so it is freed on return."""
    device = setup.device
    config = model_config(setup.preset)
    model = build_model(config, device, DTYPES[setup.dtype], setup.options.seed)
    if setup.grad_checkpointing:
        enable_checkpointing(model, "non-reentrant")  # HF's default
    model, optimizer = METHODS[method](model, setup.options)
    generator = torch.Generator().manual_seed(setup.options.seed + 1)
    ids = torch.randint(0, config.vocab_size, (setup.batch, setup.seq), generator=generator)
    ids = ids.to(device)
    batch = {"input_ids": ids, "labels": ids}
    row = Row(method, trainable=count_trainable(model))
    for _ in range(setup.warmup):
        train_step(model, optimizer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    row.ms_steps = [timed(lambda: train_step(model, optimizer, batch), device)[1] for _ in range(setup.steps)]
    row.ms = statistics.median(row.ms_steps)
    row.ms_min, row.ms_max = min(row.ms_steps), max(row.ms_steps)
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(row: Row) -> str:
    if row.error:
        return f"[bench] {row.method}: {row.error}"
    peak = f", peak {row.peak_gib:.2f} GiB" if row.peak_gib is not None else ""
    return f"[bench] {row.method}: {row.ms:.1f} ms (min {row.ms_min:.1f}, max {row.ms_max:.1f}){peak}"


def run_methods(
    methods: list[str], setup: Setup, finished: Callable[[list[Row]], None] | None = None
) -> list[Row]:
    """Measure each method in turn; a failure (e.g. out of memory) becomes that row's error.
    `finished(rows)` runs after every row (the report is rewritten, so a run cut short keeps them)."""
    rows = []
    for method in methods:
        print(f"[bench] {method} ...", file=sys.stderr, flush=True)
        try:
            row = measure(method, setup)
        except Exception as err:  # recorded in the table; the other methods still run
            first_line = (str(err).strip().splitlines() or [""])[0]
            row = Row(method, error=f"{type(err).__name__}: {first_line[:300]}")
        _free(setup.device)
        print(_progress(row), file=sys.stderr, flush=True)
        rows.append(row)
        if finished is not None:
            finished(rows)
    return rows


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def table(rows: list[Row], setup: Setup) -> str:
    """Markdown table with each method's ratio to the floor's time and memory."""
    floor = next((r for r in rows if r.method == "floor" and r.error is None), None)
    base_ms, base_gib = (floor.ms, floor.peak_gib) if floor else (None, None)
    peak = "peak GiB" if setup.device.type == "cuda" else "peak GiB (CUDA only)"
    lines = [
        f"| method | ms (median of {setup.steps}) | min | max | x floor | {peak} | x floor | trainable "
        "| error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, lo, hi = (f"{v:.1f}" if v is not None else "-" for v in (r.ms, r.ms_min, r.ms_max))
        gib = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        trainable = f"{r.trainable / 1e6:.2f} M" if r.trainable is not None else "-"
        lines.append(
            f"| {r.method} | {ms} | {lo} | {hi} | {_ratio(r.ms, base_ms)} | {gib} "
            f"| {_ratio(r.peak_gib, base_gib)} | {trainable} | {r.error or ''} |"
        )
    return "\n".join(lines)


def report(rows: list[Row], setup: Setup, command: str) -> dict[str, Any]:
    """Everything needed to compare this run with the anchors later: card, versions, command, backends."""
    cuda = setup.device.type == "cuda"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "card": torch.cuda.get_device_name(setup.device)
        if cuda
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "peft": package_version("peft"),
            "triton": package_version("triton"),
            "slimtune": slimtune.__version__,
        },
        "setup": {
            **{k: v for k, v in asdict(setup).items() if k not in ("device", "options")},
            "device": str(setup.device),
            "model_config": model_config(setup.preset).to_dict(),
            "cpu_threads": torch.get_num_threads() if setup.device.type == "cpu" else None,
            "method_options": asdict(setup.options),
        },
        "backends": slimtune.info(quiet=True),
        "rows": [asdict(r) for r in rows],
    }


def markdown(data: dict[str, Any], table_text: str) -> str:
    """The human-readable report; the table comes last so `tail` shows it."""
    s = data["setup"]
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items())
    return "\n".join(
        [
            f"# slimtune bench: {s['preset']}, {s['batch']} x {s['seq']}, {s['dtype']}"
            + (", gradient checkpointing" if s["grad_checkpointing"] else ""),
            "",
            f"- card: {data['card']}",
            f"- versions: {versions}",
            f"- date: {data['date']}",
            f"- command: `{data['command']}`",
            f"- step: forward with labels, backward, optimizer step, zero_grad; {s['warmup']} warm-up, "
            f"median of {s['steps']} timed steps; peak = torch.cuda.max_memory_allocated over them",
            f"- method options: {', '.join(f'{k}={v}' for k, v in s['method_options'].items())}",
            "- PaCA and S2FT keep float32 masters of their trained entries in a half-precision model "
            "(their default): 4 bytes per trained entry and 4 for its gradient instead of 2 and 2; "
            "`slimtune profile` accounts them (column 'of which fp32 masters')",
            *(
                [f"- CPU threads: {s['cpu_threads']} (a CPU time, never a GPU result)"]
                if s["cpu_threads"]
                else []
            ),
            "",
            "## Backends (slimtune info)",
            "",
            "```",
            data["backends"],
            "```",
            "",
            "## Results",
            "",
            table_text,
            "",
        ]
    )


def report_stem(setup: Setup, out_dir: Path) -> Path:
    """The report's path without suffix: model, shape, checkpointing, dtype and the start time."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    gc_tag = "-gc" if setup.grad_checkpointing else ""
    name = setup.preset if setup.preset in PRESETS else Path(setup.preset).stem
    return out_dir / f"bench-{name}-{setup.batch}x{setup.seq}{gc_tag}-{setup.dtype}-{stamp}"


def write(data: dict[str, Any], table_text: str, stem: Path) -> Path:
    """`stem`.json and `stem`.md, each replaced atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(stem.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    return files.write_text(stem.with_suffix(".md"), markdown(data, table_text))


def main(args: argparse.Namespace, command: str) -> int:
    device: torch.device = args.device
    preset = args.model or ("tinyllama-1.1b" if device.type == "cuda" else "tiny")
    batch, seq = DEFAULT_SHAPE.get(preset, (8, 2048) if device.type == "cuda" else (2, 64))
    setup = Setup(
        preset=preset,
        batch=args.batch or batch,
        seq=args.seq or seq,
        dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"),
        device=device,
        grad_checkpointing=args.grad_checkpointing,
        warmup=args.warmup,
        steps=args.steps,
        options=MethodOptions(
            paca_r=args.paca_r, lora_r=args.lora_r, paca_optimizer=args.optimizer, seed=args.seed
        ),
    )
    try:
        model_config(preset)
    except ValueError as err:
        print(f"slimtune bench: {err}", file=sys.stderr)
        return 2
    stem = report_stem(setup, Path(args.out))

    def finished(rows: list[Row]) -> None:
        write(report(rows, setup, command), table(rows, setup), stem)

    rows = run_methods(args.methods or list(DEFAULT_METHODS), setup, finished)
    print(f"wrote {stem}.md and {stem.name}.json", file=sys.stderr)
    print(table(rows, setup))
    return 1 if all(r.error for r in rows) else 0
