"""slimtune: sparse and partial fine-tuning of Hugging Face models with custom kernels."""

__version__ = "0.1.0"

from .checkpoint import load, save
from .config import HydraConfig, LoRAConfig, PaCAConfig, S2FTConfig
from .info import info
from .methods.lora import unmerge
from .model import apply, merge, trainable_parameters
from .optim import PartialAdamW
from .peft_compat import load_peft
from .sparse_delta import SparseDelta, delta, load_delta

__all__ = [
    "HydraConfig",
    "LoRAConfig",
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
    "load_peft",
    "merge",
    "save",
    "trainable_parameters",
    "unmerge",
]
