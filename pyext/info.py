"""`slimtune info`: which backend every op uses on each device, and why."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, _ext
from .ops import OPS, backend_unavailable
from .registry import methods


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(quiet: bool = False) -> str:
    """Print (unless `quiet`) and return a report of versions and the backend of every op, with reasons."""
    lines = [
        f"slimtune {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
        + "  ".join(f"{name} {_version(name)}" for name in ("transformers", "peft", "triton")),
        f"extension slimtune._C: {'built' if _ext.available() else 'missing: ' + str(_ext.load_error())}"
        + (
            f", CUDA kernels {'compiled' if _ext.cuda_compiled() else 'not compiled'}"
            if _ext.available()
            else ""
        ),
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
    ]
    triton_problem = backend_unavailable("triton", torch.device("cuda"))
    lines.append(f"triton: {'usable on CUDA' if triton_problem is None else triton_problem}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines.append("")
    lines.append(f"{'op':<16} {'device':<7} {'backend':<7} why")
    for op in OPS.values():
        for device in devices:
            backend, reason = op.choose(device)
            lines.append(f"{op.name:<16} {device.type:<7} {backend:<7} {reason}")
        if not torch.cuda.is_available():
            prefers = ", ".join(op.prefer_cuda or ("torch",))
            lines.append(f"{op.name:<16} {'cuda':<7} {'-':<7} no CUDA device here (would use {prefers})")
    lines.append("")
    lines.append(f"{'method':<8} {'config':<13} capabilities")
    for name, method in methods().items():
        lines.append(f"{name:<8} {method.config.__name__:<13} {', '.join(sorted(method.capabilities))}")
    report = "\n".join(lines)
    if not quiet:
        print(report)
    return report
