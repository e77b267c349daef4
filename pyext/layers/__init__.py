"""Drop-in replacements for `nn.Linear`, one module per method."""

from .paca import PaCALinear

__all__ = ["PaCALinear"]
