"""Keep Triton's CPU interpreter working on NumPy >= 2.4 with Triton releases before the fix.

Triton 3.6's interpreter turns a one-element block into a Python index with `int(array)` (a loop
bound computed from `tl.program_id`, e.g. `range(n_start, n_end, BLOCK_N)`); NumPy 2.4 refuses that
for arrays that are not 0-dimensional. Later Triton releases squeeze the array first. On a Triton
whose interpreter does not, the same squeeze is installed through the interpreter's own patch
scope (so it is undone with the rest of its patches after each launch). Nothing changes on a
compiled (GPU) launch or on a Triton that already squeezes.
"""

from __future__ import annotations

import inspect


def squeeze_block_indices() -> bool:
    """Install the guard where needed; True if it was installed."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_slimtune_guard", False):
        return False
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data)" not in source:  # squeezes already (or changed shape): leave it alone
        return False

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._slimtune_guard = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
