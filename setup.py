"""Build glue for slimtune: package layout and the CMake-built ``slimtune._C`` extension.

Metadata lives in pyproject.toml. Environment knobs:
  SLIMTUNE_BUILD_EXT=0   pure-Python install, no compiled extension
  SLIMTUNE_WITH_CUDA=0   CPU-only extension (1 = CUDA required; unset = CUDA if nvcc is found)
  SLIMTUNE_CUDA_ARCHS    CUDA architectures, CMake syntax (default "80;90")
  MAX_JOBS               parallel compile jobs (default 2)
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(module: str, attr: str, name: str) -> str:
    """Prefer the pip-installed cmake/ninja (pinned in pyproject), else the one on PATH."""
    try:
        bin_dir = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        bin_dir = None
    found = (bin_dir and shutil.which(name, path=bin_dir)) or shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"slimtune: `{name}` not found; install it (pip install {name}) or set SLIMTUNE_BUILD_EXT=0"
        )
    return found


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt with Ninja; failures abort the install."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = {"0": "OFF", "1": "ON"}.get(os.environ.get("SLIMTUNE_WITH_CUDA", ""), "AUTO")
        jobs = os.environ.get("MAX_JOBS", "2")
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        configure = [
            cmake,
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            f"-DSLIMTUNE_CUDA={cuda}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('SLIMTUNE_CUDA_ARCHS', '80;90')}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        if not target.is_file():
            raise RuntimeError(f"slimtune: CMake finished but {target} was not produced")


ext_modules = [Extension("slimtune._C", sources=[])]
if os.environ.get("SLIMTUNE_BUILD_EXT", "1") == "0":
    ext_modules = []
    # An earlier editable build left its copy in the source tree; drop it so the install has no extension.
    for stale in (ROOT / "pyext").glob("_C.*"):
        if stale.suffix in (".so", ".pyd"):
            stale.unlink()

setup(
    package_dir={"slimtune": "pyext", "slimtune.triton_kernels": "triton_kernels"},
    packages=["slimtune", "slimtune.triton_kernels"] + [f"slimtune.{p}" for p in find_packages("pyext")],
    # the shipped recipes (with their data) and the demo's data install with the package
    package_data={
        "slimtune": ["recipes/*.yaml", "recipes/data/*.jsonl"],
        "slimtune.apps.train": ["demo_data/*.jsonl"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
