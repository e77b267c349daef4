"""slimtune: sparse and partial fine-tuning of Hugging Face models with custom kernels."""

__version__ = "0.1.0"

from .checkpoint import load, save
from .config import PaCAConfig, S2FTConfig
from .info import info
from .model import apply, merge, trainable_parameters
from .optim import PartialAdamW
from .sparse_delta import SparseDelta, delta, load_delta

__all__ = [
    "PaCAConfig",
    "PartialAdamW",
    "S2FTConfig",
    "SparseDelta",
    "__version__",
    "apply",
    "delta",
    "info",
    "load",
    "load_delta",
    "merge",
    "save",
    "trainable_parameters",
]
