"""The sequential fine-tuning toolbox as plain functions, callable from any training loop (HF
Trainer, TRL, your own): each tool a module of its own. `slimtune train` runs them from recipes.

- `hft`: Half Fine-Tuning's selection (which half of every block trains) and freezing by it;
- `lines`: LiNeS, the change of a fine-tune scaled down most in the shallow blocks.

(Moving here from the trainer, tool by tool: CorDA, soft prompts and intruder dimensions are
`slimtune.corda`, `slimtune.prompt` and `slimtune.diagnostics`; LT-SFT masks, FPF/k-FPF and grafting
are still in `slimtune.apps.train`.)
"""

from . import hft, lines

__all__ = ["hft", "lines"]
