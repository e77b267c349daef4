"""The sequential fine-tuning toolbox as plain functions, callable from any training loop (HF
Trainer, TRL, your own): each tool a module of its own. `slimtune train` runs them from recipes.

- `hft`: Half Fine-Tuning's selection (which half of every block trains) and freezing by it;
- `lines`: LiNeS, the change of a fine-tune scaled down most in the shallow blocks;
- `graft`: skill localisation by grafting (`localize`, `overlap`), the authors' procedure included;
- `fpf`: FPF's module choice (`drift`, `choose`, `parameters`); `ltsft`: LT-SFT's masks
  (`top_k_masks`, `mask_gradients`); `params`: `snapshot` and `restore` of all parameters.

(Moving here from the trainer, tool by tool: CorDA, soft prompts and intruder dimensions are
`slimtune.corda`, `slimtune.prompt` and `slimtune.diagnostics`; the trainer keeps what needs its
data and loop: the replay buffer and FPF step, k-FPF's schedule, DMT's mixing. Every entry-level
change these tools make (LT-SFT diffs, grafts) is a `slimtune.SparseDelta`, like PaCA's and S2FT's.)
"""

from . import fpf, graft, hft, lines, ltsft, params

__all__ = ["fpf", "graft", "hft", "lines", "ltsft", "params"]
