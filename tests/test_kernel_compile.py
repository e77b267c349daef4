"""Every Triton kernel compiles offline for sm_90 and sm_80 at the launchers' TinyLlama configurations,
and the committed table (benchmarks/results/triton-compile.md) was made from the current sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_compile_for_sm90_and_sm80_and_the_table_is_current() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/compile_kernels.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = "\n".join(run.stderr.splitlines()[-15:])
    assert run.returncode == 0, tail
    assert "0 errors" in run.stderr, tail
