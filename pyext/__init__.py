"""slimtune: sparse and partial fine-tuning of Hugging Face models with custom kernels."""

__version__ = "0.1.0"

from .checkpoint import load, save
from .config import PaCAConfig
from .info import info
from .model import apply, merge, trainable_parameters
from .optim import PartialAdamW

__all__ = [
    "PaCAConfig",
    "PartialAdamW",
    "__version__",
    "apply",
    "info",
    "load",
    "merge",
    "save",
    "trainable_parameters",
]
