"""Method glue: how each config selects modules, builds layers and round-trips through checkpoints."""

from __future__ import annotations

from ..config import MethodConfig
from .base import Method, Plan, Replacement
from .lora import HydraMethod, LoRAMethod
from .paca import PaCAMethod
from .s2ft import S2FTMethod

METHODS: dict[str, Method] = {
    method.name: method for method in (PaCAMethod(), S2FTMethod(), LoRAMethod(), HydraMethod())
}


def method_for(config: MethodConfig) -> Method:
    try:
        return METHODS[config.method]
    except KeyError:
        raise ValueError(f"no slimtune method named {config.method!r}; known: {sorted(METHODS)}") from None


__all__ = ["METHODS", "Method", "Plan", "Replacement", "method_for"]
