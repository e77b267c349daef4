"""Compile every Triton kernel offline for sm_90 and sm_80, at the configurations the launchers
choose for the TinyLlama-1.1B step shapes (8 x 2048 tokens, hidden 2048, intermediate 5632, 4 kv
heads, rank 16 / 64 columns), in bf16 and fp16. No GPU is needed.

The launchers run on meta tensors with the kernel launch replaced by a recorder, so the block
sizes, warps, stages and constexprs are exactly those the launchers pick (every config of an
autotuned kernel, since the autotuner chooses among them at run time). Each launch is compiled
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, specialised as Triton's
JIT would (integer 1 as a constant; 16-divisible integers and pointers marked divisible), and the
PTX is assembled by the bundled ptxas for registers and spills.

    python benchmarks/compile_kernels.py [--out benchmarks/results/triton-compile.md] [--check]

Writes a Markdown table and a JSON file; exits 1 on any compile error. `--check` also fails when
the committed table was made from other kernel sources than the current ones (a hash of
triton_kernels/*.py is recorded in it).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick their GPU configurations
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "triton_kernels"
CARDS = {"sm_90": (90, 232448, 132), "sm_80": (80, 166912, 108)}  # (cc, max shared bytes/block, SMs)
TOKENS, HIDDEN, INTER, KV, RANK, COLUMNS = 8 * 2048, 2048, 5632, 256, 16, 64
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
              torch.int32: "i32"}  # fmt: skip


def sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(KERNELS.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Launch:
    kernel: KernelInterface
    args: tuple
    kwargs: dict
    use: str  # what the launcher was called for


_recorded: list[Launch] = []
_current_use = ""


def _record(self: KernelInterface, grid):
    def launch(*args, **kwargs):
        _recorded.append(Launch(self, args, kwargs, _current_use))

    return launch


def _meta_factory(dtype: torch.dtype):
    def make(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    return make


def _lean_calls(k, m) -> list[tuple[str, object, tuple]]:
    """The lean frozen path's launches at the TinyLlama shapes (32 heads of 64, vocabulary 32000 in
    chunks of 1024 tokens, 4096-token chunks of the MLP backward)."""
    rows, chunk, vocab = m(TOKENS, HIDDEN), 4096, 32000
    gate, up = m(chunk, INTER), m(chunk, INTER)
    q = m(8, 2048, 32, 64).transpose(1, 2)
    table = m(8, 2048, 64)
    targets = torch.empty(1024, dtype=torch.int64, device="meta")
    scale = torch.empty(1, dtype=torch.float32, device="meta")
    rstd = torch.empty(TOKENS, dtype=torch.float32, device="meta")
    norm, dh = k.rms_norm, m(chunk, INTER)
    return [
        ("rms_norm forward (N x 2048)", norm.rms_norm_forward, (rows, m(HIDDEN), 1e-5, 0.0, False)),
        (
            "rms_norm backward (N x 2048)",
            norm.rms_norm_backward,
            (rows, rows, m(HIDDEN), rstd, 0.0, False, True),
        ),
        ("rope q (8 x 32 x 2048 x 64)", k.rope.rope, (q, table, table, False)),
        ("glu act(gate) * up (4096-token chunk)", k.lora.glu, (gate, up, "silu")),
        ("glu_backward in place (lean MLP)", k.lora.glu_backward, (dh, gate, up, "silu", gate, up, False)),
        ("cross_entropy_ (1024 x 32000)", k.cross_entropy.cross_entropy_, (m(1024, vocab), targets, scale)),
    ]


def _calls(k, m) -> list[tuple[str, object, tuple]]:
    """(what, launcher, arguments) at the TinyLlama shapes; `m(*shape)` makes a meta tensor."""
    columns, column_grad, lora = k.columns, k.column_grad, k.lora
    idx = torch.empty(COLUMNS, dtype=torch.int64, device="meta")
    qkv_dys = [m(TOKENS, HIDDEN), m(TOKENS, KV), m(TOKENS, KV)]
    qkv_weights = [m(HIDDEN, HIDDEN), m(KV, HIDDEN), m(KV, HIDDEN)]
    big = [m(TOKENS, INTER) for _ in range(5)]
    return [
        ("gather x[:, idx] (N x 2048 -> 64)", columns.gather_columns, (m(TOKENS, HIDDEN), idx)),
        ("gather x[:, idx] (N x 5632 -> 64)", columns.gather_columns, (m(TOKENS, INTER), idx)),
        ("scatter W[:, idx] (5632 x 2048)", columns.scatter_columns, (m(INTER, HIDDEN), idx, m(INTER, 64))),
        ("scatter W[:, idx] (2048 x 5632)", columns.scatter_columns, (m(HIDDEN, INTER), idx, m(HIDDEN, 64))),
        (
            "column_grad dy^T x[:, idx] (5632 out)",
            column_grad.column_grad,
            (m(TOKENS, INTER), m(TOKENS, HIDDEN), idx),
        ),
        (
            "column_grad dy^T x[:, idx] (256 out)",
            column_grad.column_grad,
            (m(TOKENS, KV), m(TOKENS, HIDDEN), idx),
        ),
        (
            "column_grad dy^T compact (2048 out)",
            column_grad.column_grad,
            (m(TOKENS, HIDDEN), m(TOKENS, COLUMNS)),
        ),
        (
            "lora_linear x W^T + u b^T (up_proj)",
            lora.lora_linear,
            (m(TOKENS, HIDDEN), m(INTER, HIDDEN), None, m(TOKENS, RANK), m(INTER, RANK)),
        ),
        (
            "lora_input_grad q/k/v (4 terms)",
            lora.lora_input_grad,
            (m(TOKENS, 3 * RANK), m(3 * RANK, HIDDEN), qkv_dys, qkv_weights),
        ),
        ("glu_down act(gate) * up, u = h a^T", lora.glu_down, (big[0], big[1], m(RANK, INTER), "silu")),
        ("glu_backward (recomputes h)", lora.glu_backward, (big[0], big[1], big[2], "silu", big[3], big[4])),
        *_lean_calls(k, m),
    ]


def record_launches(sms: int) -> list[Launch]:
    """Call every launcher at the TinyLlama shapes on meta tensors; return what they would launch."""
    global _current_use
    import importlib

    names = ("_common", "column_grad", "columns", "lora", "rms_norm", "rope", "cross_entropy")
    k = SimpleNamespace(
        **{name: importlib.import_module(f"slimtune.triton_kernels.{name}") for name in names}
    )

    KernelInterface.__getitem__ = _record
    for module in vars(k).values():
        if hasattr(module, "check_devices"):
            module.check_devices = lambda **tensors: next(iter(tensors.values())).device
        if hasattr(module, "num_sms"):
            module.num_sms = lambda device: sms
    _recorded.clear()
    for dtype in (torch.bfloat16, torch.float16):
        for use, launcher, args in _calls(k, _meta_factory(dtype)):
            _current_use = f"{use}, {TYPE_NAMES[dtype]}"
            launcher(*args)
    return list(_recorded)


def _signature(fn: JITFunction, bound: dict) -> tuple[dict, dict, dict]:
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[param.name], constexprs[param.name] = "constexpr", 1
            else:
                signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value is None:
            signature[param.name], constexprs[param.name] = "constexpr", None
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, attrs


def variants(launch: Launch) -> list[tuple[JITFunction, dict, int, int, str]]:
    """(kernel, bound arguments, warps, stages, config label) for each config the launch may run."""
    kernel = launch.kernel
    configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    out = []
    for config in configs:
        kwargs = dict(launch.kwargs)
        warps, stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
        if config is not None:
            kwargs.update(config.kwargs)
            warps, stages = config.num_warps, config.num_stages
        names = [p.name for p in fn.params]
        bound = dict(zip(names, launch.args, strict=False)) | kwargs
        for p in fn.params:  # defaults of unset constexprs
            if p.name not in bound and p.default is not inspect.Parameter.empty:
                bound[p.name] = p.default
        blocks = {k: v for k, v in bound.items() if k.startswith("BLOCK") or k in ("GROUP_N", "TERMS")}
        label = ", ".join(f"{k}={v}" for k, v in blocks.items()) + f", warps={warps}, stages={stages}"
        out.append((fn, bound, warps, stages, label))
    return out


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) from the bundled ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(CARDS[arch][0]).path  # the ptxas Triton itself assembles with
    gpu = f"{arch}a" if arch == "sm_90" else arch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = run.stdout + run.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def tensor_cores(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma (Hopper)"
    if "mma.sync" in ptx:
        return "mma.sync (Ampere)"
    return "none (no dot)"


@dataclass
class Compiled:
    arch: str
    kernel: str
    use: str
    config: str
    registers: int | None = None
    spills: int | None = None
    shared: int | None = None
    shared_limit: int = 0
    tensor_cores: str = ""
    seconds: float = 0.0
    error: str | None = None


def compile_all() -> list[Compiled]:
    results, seen = [], set()
    for arch, (cc, shared_limit, sms) in CARDS.items():
        target = GPUTarget("cuda", cc, 32)
        for launch in record_launches(sms):
            for fn, bound, warps, stages, label in variants(launch):
                signature, constexprs, attrs = _signature(fn, bound)
                key = (
                    arch,
                    fn.__name__,
                    json.dumps(signature),
                    json.dumps(constexprs, default=str),
                    warps,
                    stages,
                )
                if key in seen:
                    continue
                seen.add(key)
                row = Compiled(arch, fn.__name__, launch.use, label, shared_limit=shared_limit)
                start = time.perf_counter()
                try:
                    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                    compiled = triton.compile(
                        src, target=target, options={"num_warps": warps, "num_stages": stages}
                    )
                    ptx = compiled.asm["ptx"]
                    row.registers, row.spills = ptxas_usage(ptx, arch)
                    row.shared = compiled.metadata.shared
                    row.tensor_cores = tensor_cores(ptx)
                    if row.shared > shared_limit:
                        row.error = f"needs {row.shared} bytes of shared memory, the card has {shared_limit}"
                except Exception as err:  # reported in the table; the run fails at the end
                    row.error = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:200]}"
                row.seconds = time.perf_counter() - start
                results.append(row)
                status = row.error or f"{row.registers} regs, {row.spills} spill bytes, {row.shared} B smem"
                print(f"[compile] {arch} {fn.__name__} {label}: {status}", file=sys.stderr, flush=True)
    return results


def markdown(rows: list[Compiled], digest: str, seconds: float) -> str:
    lines = [
        "# Triton kernels compiled offline for sm_90 and sm_80",
        "",
        f"- command: `python benchmarks/compile_kernels.py` (no GPU; {seconds:.0f} s on this machine, "
        "less with Triton's compile cache warm)",
        f"- triton {triton.__version__}, torch {torch.__version__}; kernel sources hash `{digest}`",
        "- shapes: the TinyLlama-1.1B step (8 x 2048 tokens, hidden 2048, intermediate 5632, kv 256, "
        "rank 16, 64 columns), bf16 and fp16; every config of an autotuned kernel",
        "- registers and spills from the ptxas Triton assembles with; shared memory from the compiled "
        "kernel against the card's per-block limit (sm_90: 227 KiB, sm_80: 163 KiB)",
        "",
        "Spilling configurations (a GPU run should check whether the autotuner ever picks them):",
        "",
        *(
            [
                f"- {r.arch} {r.kernel} ({r.use}; {r.config}): {r.registers} registers, {r.spills} B spilled"
                for r in rows
                if r.spills
            ]
            or ["- none"]
        ),
        "",
        "| arch | kernel | launched for | config | registers | spill bytes | shared KiB (limit) "
        "| tensor cores | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shared = f"{r.shared / 1024:.1f} ({r.shared_limit / 1024:.0f})" if r.shared is not None else "-"
        registers = r.registers if r.registers is not None else "-"
        spills = r.spills if r.spills is not None else "-"
        lines.append(
            f"| {r.arch} | {r.kernel} | {r.use} | {r.config} | {registers} | {spills} | {shared} "
            f"| {r.tensor_cores} | {r.error or ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/triton-compile.md"))
    parser.add_argument("--check", action="store_true", help="also fail if the committed table is stale")
    args = parser.parse_args()
    out = Path(args.out)
    digest = sources_hash()
    stale = None
    if args.check and out.exists() and f"`{digest}`" not in out.read_text():
        stale = f"{out} was made from other kernel sources: rerun benchmarks/compile_kernels.py and commit it"
    start = time.perf_counter()
    rows = compile_all()
    seconds = time.perf_counter() - start
    if not args.check or not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(rows, digest, seconds))
        out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    errors = [r for r in rows if r.error]
    print(f"[compile] {len(rows)} compiled, {len(errors)} errors, {seconds:.0f} s", file=sys.stderr)
    for r in errors:
        print(f"[compile] ERROR {r.arch} {r.kernel} {r.config}: {r.error}", file=sys.stderr)
    if stale:
        print(f"[compile] {stale}", file=sys.stderr)
    return 1 if errors or stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
