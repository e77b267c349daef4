"""slimtune: sparse and partial fine-tuning of Hugging Face models with custom kernels.

The library core is this package minus `slimtune.apps` (trainer, bench, demo, CLI), which uses
only the names exported here and the public modules `registry`, `architectures` and `ops`.
"""

__version__ = "0.1.0"

from . import (
    architectures,
    corda,
    diagnostics,
    files,
    models,
    ops,
    prompt,
    quantized,
    registry,
    seeding,
    sharding,
    targets,
    toolbox,
    transaction,
)
from .config import HydraConfig, LoRAConfig, MethodConfig, PaCAConfig, S2FTConfig
from .info import info
from .lean_mode import lean, lean_report, unlean
from .optim import PartialAdamW
from .patching import (
    apply,
    load,
    merge,
    print_trainable_summary,
    report,
    save,
    trainable_parameters,
    trainable_summary,
    unmerge,
)
from .peft_compat import load_peft
from .sparse_delta import DeltaEntry, SparseDelta, add_sparse, delta, load_delta
from .targets import on_meta

__all__ = [
    "DeltaEntry",
    "HydraConfig",
    "LoRAConfig",
    "MethodConfig",
    "PaCAConfig",
    "PartialAdamW",
    "S2FTConfig",
    "SparseDelta",
    "__version__",
    "add_sparse",
    "apply",
    "architectures",
    "corda",
    "delta",
    "diagnostics",
    "files",
    "info",
    "lean",
    "lean_report",
    "load",
    "load_delta",
    "load_peft",
    "merge",
    "models",
    "on_meta",
    "ops",
    "print_trainable_summary",
    "prompt",
    "quantized",
    "registry",
    "report",
    "save",
    "seeding",
    "sharding",
    "targets",
    "toolbox",
    "trainable_parameters",
    "trainable_summary",
    "transaction",
    "unlean",
    "unmerge",
]
