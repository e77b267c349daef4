"""docs/toolbox.md is a working guide: its Python blocks, run in order with HF Trainer on a tiny
Llama, use every toolbox tool from a plain training loop without error (and its asserts hold)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "toolbox.md"


def test_every_block_of_the_toolbox_guide_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 9
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "toolbox_guide"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{number}", "exec"), namespace)
    assert (tmp_path / "task.safetensors").is_file()
    assert namespace["intruders"]  # the last block's diagnostics ran on the trained model
