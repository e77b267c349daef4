"""Drop-in replacements for `nn.Linear`, one module per method."""

from .lora import HydraLinear, LoRALinear
from .paca import PaCALinear
from .partial import PartialLinear

__all__ = ["HydraLinear", "LoRALinear", "PaCALinear", "PartialLinear"]
