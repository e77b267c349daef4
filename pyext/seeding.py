"""Seeds derived from a seed and a name: a module's columns or adapter init, a trainer stage's draws.

Keyed by name, not by position or device, so the same module (or stage) draws the same values
wherever it sits and on any device.
"""

from __future__ import annotations

import zlib

import torch


def derived(seed: int, name: str) -> int:
    """The seed of `name` under `seed`."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded for `name` under `seed`."""
    return torch.Generator().manual_seed(derived(seed, name) % 2**63)
