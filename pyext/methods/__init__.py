"""Method glue: how each config selects modules, builds layers and round-trips through checkpoints.

Importing this package registers every built-in method in `slimtune.registry`.
"""

from __future__ import annotations

from ..config import MethodConfig
from ..registry import for_config
from . import lora, paca, s2ft  # noqa: F401  (each registers its methods)
from .base import Method, Plan, Replacement


def method_for(config: MethodConfig) -> Method:
    """The glue of `config`'s method (ValueError naming the known methods if none)."""
    return for_config(config).glue


__all__ = ["Method", "Plan", "Replacement", "method_for"]
