"""Atomic file writes: a file is either absent, the old version, or complete (never truncated).

Everything slimtune writes (checkpoints, deltas, PEFT directories, the trainer's run folder) goes
through these, so a kill -9 mid-write cannot leave a file that a later load or `--resume` trips on.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    partial = _partial(path)
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_tensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """`safetensors.torch.save_file`, atomically."""
    path = Path(path)
    partial = _partial(path)
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # gone after the rename; a failed write leaves nothing
    return path
