"""The dtype a layer's products run in under `torch.autocast`, decided before a custom autograd
function: its backward does not replay autocast, so the inputs and weights are cast up front and the
function runs with autocast off, every saved tensor and gradient product then in one dtype (as the
model's own modules compute under autocast)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# Device types with an autocast, asked once at import: `torch.amp.is_autocast_available` is not
# traceable by torch.compile on every torch (2.11 breaks the graph there), a set lookup is.
_AUTOCAST_DEVICES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla") if torch.amp.is_autocast_available(d)
)


def autocast_dtype(device: str) -> torch.dtype | None:
    """The autocast dtype on `device` if autocast is on there (never on meta), else None."""
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_off(device: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device, enabled=False)


def cast_floating(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """`t` in `dtype` if it is a floating tensor (an index or None stays as it is)."""
    return t.to(dtype) if t is not None and t.is_floating_point() else t
