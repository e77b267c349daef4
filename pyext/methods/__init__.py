"""Method glue: how each config selects modules, builds layers and round-trips through checkpoints."""

from __future__ import annotations

from ..config import MethodConfig
from .base import Method, Replacement
from .paca import PaCAMethod

METHODS: dict[str, Method] = {PaCAMethod.name: PaCAMethod()}


def method_for(config: MethodConfig) -> Method:
    try:
        return METHODS[config.method]
    except KeyError:
        raise ValueError(f"no slimtune method named {config.method!r}; known: {sorted(METHODS)}") from None


__all__ = ["METHODS", "Method", "Replacement", "method_for"]
