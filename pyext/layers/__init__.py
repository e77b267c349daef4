"""Drop-in replacements for `nn.Linear`, one module per method."""

from .lora import HydraLinear, LoRALinear
from .paca import PaCALinear
from .partial import PartialLinear
from .qlora import QHydraLinear, QLoRALinear
from .qpaca import QPaCALinear
from .s2ft import S2FTLinear

__all__ = [
    "HydraLinear",
    "LoRALinear",
    "PaCALinear",
    "PartialLinear",
    "QHydraLinear",
    "QLoRALinear",
    "QPaCALinear",
    "S2FTLinear",
]
