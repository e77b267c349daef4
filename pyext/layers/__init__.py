"""Drop-in replacements for `nn.Linear`, one module per method."""

from .paca import PaCALinear
from .partial import PartialLinear

__all__ = ["PaCALinear", "PartialLinear"]
