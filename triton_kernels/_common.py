"""Shared argument checks for the column kernels.

The wrappers validate on the host only (shapes, dtypes, devices) and never read
index values, because that would force a device sync in the training hot path.
"""

from __future__ import annotations

import functools
import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated,
# from this variable, so reading it at import time matches what the kernels do.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    from ._interpreter import squeeze_block_indices

    squeeze_block_indices()  # Triton <= 3.6's interpreter on NumPy >= 2.4
# SLIMTUNE_TRITON_AUTOTUNE=0: one tile instead of an autotuned list, so that a correctness run (the
# GPU tests) does not pay an autotuning sweep per new shape on its first call.
AUTOTUNE = os.environ.get("SLIMTUNE_TRITON_AUTOTUNE", "1") != "0"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_matrix(name: str, t: object) -> torch.Tensor:
    """Require a 2-D floating tensor of a dtype the kernels support."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    return t


def check_index(idx: object, device: torch.device) -> torch.Tensor:
    """Require a 1-D int64 index vector on ``device``."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"idx is on {idx.device} but the data is on {device}")
    return idx


def check_devices(**tensors: torch.Tensor) -> torch.device:
    """Require one common device that Triton can run on (CPU only when interpreting)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if first.type != "cuda" and not (INTERPRET and first.type == "cpu"):
        raise ValueError(
            f"tensors are on {first}; the Triton kernels need CUDA tensors "
            "(CPU tensors work only with TRITON_INTERPRET=1 set before import)"
        )
    return first


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in under the interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)
